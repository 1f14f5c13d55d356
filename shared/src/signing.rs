//! Standard Webhooks signing and verification (<https://www.standardwebhooks.com>).
//!
//! Pure functions over raw key bytes: no I/O, no clock. The signed content is
//! `{msg_id}.{timestamp}.{body}`, MAC'd with HMAC-SHA256 and sent as `v1,<base64>`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Version prefix of symmetric (HMAC-SHA256) signatures.
const SIGNATURE_VERSION: &str = "v1";

/// Prefix of secrets in their string form.
const SECRET_PREFIX: &str = "whsec_";

/// How far the timestamp may drift from `now`, in either direction, by default.
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

/// Header names, used only to say which one is missing.
const ID_HEADER: &str = "webhook-id";
const TIMESTAMP_HEADER: &str = "webhook-timestamp";
const SIGNATURE_HEADER: &str = "webhook-signature";

/// Why a webhook failed verification.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("missing or empty {0} header")]
    MissingHeader(&'static str),
    #[error("webhook-timestamp is not an integer number of seconds")]
    InvalidTimestamp,
    #[error("webhook-timestamp is too far in the past")]
    TimestampTooOld,
    #[error("webhook-timestamp is too far in the future")]
    TimestampTooNew,
    #[error("no v1 signature matches")]
    NoMatchingSignature,
}

/// Why a secret string could not be turned into key bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretDecodeError {
    #[error("secret is empty")]
    Empty,
    #[error("secret is not valid base64")]
    InvalidBase64,
}

/// A MAC that has absorbed the signed content but is not yet finalized.
#[expect(
    clippy::expect_used,
    reason = "HMAC takes keys of any length; the error case does not exist"
)]
fn keyed_mac(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length (long ones are hashed), so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Signs `{msg_id}.{timestamp}.{body}` with HMAC-SHA256; returns `v1,<base64>`.
pub fn sign(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let tag = keyed_mac(key, msg_id, timestamp, body)
        .finalize()
        .into_bytes();
    format!("{SIGNATURE_VERSION},{}", BASE64.encode(tag))
}

/// Signature header value for several keys (secret rotation): space-separated "v1,.. v1,..".
///
/// Receivers accept the message if any entry matches, so old and new keys can
/// overlap during a rotation. No keys gives an empty string.
pub fn signature_header(keys: &[&[u8]], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|key| sign(key, msg_id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Verifies: timestamp within tolerance of `now` (both directions), and at least one `v1,<b64>` entry
/// in the space-separated signature header matches (constant-time, via `Mac::verify_slice`).
/// Entries with other version prefixes, and undecodable entries, are ignored.
///
/// Checks run in order: headers present, timestamp parses, timestamp in window, signature.
/// An empty `msg_id` counts as a missing `webhook-id` header.
pub fn verify(
    key: &[u8],
    msg_id: &str,
    timestamp_header: &str,
    signature_header: &str,
    body: &[u8],
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<(), VerifyError> {
    if msg_id.is_empty() {
        return Err(VerifyError::MissingHeader(ID_HEADER));
    }
    let timestamp_text = timestamp_header.trim();
    if timestamp_text.is_empty() {
        return Err(VerifyError::MissingHeader(TIMESTAMP_HEADER));
    }
    if signature_header.trim().is_empty() {
        return Err(VerifyError::MissingHeader(SIGNATURE_HEADER));
    }

    let timestamp: i64 = timestamp_text
        .parse()
        .map_err(|_| VerifyError::InvalidTimestamp)?;
    // A negative tolerance would reject everything; treat it as "exact match only".
    let tolerance = tolerance_secs.max(0);
    // Saturating: an absurd timestamp must land outside the window, not wrap into it.
    if now_unix.saturating_sub(timestamp) > tolerance {
        return Err(VerifyError::TimestampTooOld);
    }
    if timestamp.saturating_sub(now_unix) > tolerance {
        return Err(VerifyError::TimestampTooNew);
    }

    // Sign with the timestamp as received so the MAC covers exactly what was sent.
    let expected = keyed_mac(key, msg_id, timestamp, body);
    let matched = signature_header
        .split_whitespace()
        .filter_map(|entry| entry.split_once(','))
        .filter(|(version, _)| *version == SIGNATURE_VERSION)
        .filter_map(|(_, encoded)| BASE64.decode(encoded).ok())
        .any(|tag| expected.clone().verify_slice(&tag).is_ok());
    if matched {
        Ok(())
    } else {
        Err(VerifyError::NoMatchingSignature)
    }
}

/// Decodes a `whsec_<base64>` secret string into key bytes (also accepts a string without the prefix).
///
/// Surrounding whitespace is ignored, since secrets often arrive from env vars or files
/// with a trailing newline.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, SecretDecodeError> {
    let trimmed = secret.trim();
    let encoded = trimmed.strip_prefix(SECRET_PREFIX).unwrap_or(trimmed);
    if encoded.is_empty() {
        return Err(SecretDecodeError::Empty);
    }
    BASE64
        .decode(encoded)
        .map_err(|_| SecretDecodeError::InvalidBase64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: i64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const EXPECTED_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn key() -> Vec<u8> {
        decode_secret(SECRET).unwrap()
    }

    fn verify_at(key: &[u8], signature: &str, now: i64) -> Result<(), VerifyError> {
        verify(
            key,
            MSG_ID,
            &TIMESTAMP.to_string(),
            signature,
            BODY,
            now,
            DEFAULT_TOLERANCE_SECS,
        )
    }

    #[test]
    fn sign_matches_published_vector() {
        assert_eq!(sign(&key(), MSG_ID, TIMESTAMP, BODY), EXPECTED_SIGNATURE);
    }

    #[test]
    fn verify_accepts_published_vector() {
        assert_eq!(verify_at(&key(), EXPECTED_SIGNATURE, TIMESTAMP), Ok(()));
    }

    #[test]
    fn verify_rejects_tampered_body() {
        let result = verify(
            &key(),
            MSG_ID,
            &TIMESTAMP.to_string(),
            EXPECTED_SIGNATURE,
            br#"{"test": 2432232315}"#,
            TIMESTAMP,
            DEFAULT_TOLERANCE_SECS,
        );
        assert_eq!(result, Err(VerifyError::NoMatchingSignature));
    }

    #[test]
    fn verify_rejects_wrong_secret() {
        let other_key = decode_secret("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").unwrap();
        assert_eq!(
            verify_at(&other_key, EXPECTED_SIGNATURE, TIMESTAMP),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn verify_rejects_wrong_msg_id() {
        let result = verify(
            &key(),
            "msg_other",
            &TIMESTAMP.to_string(),
            EXPECTED_SIGNATURE,
            BODY,
            TIMESTAMP,
            DEFAULT_TOLERANCE_SECS,
        );
        assert_eq!(result, Err(VerifyError::NoMatchingSignature));
    }

    #[test]
    fn verify_rejects_wrong_timestamp_in_window() {
        // The timestamp is part of the signed content, not just a freshness check.
        let result = verify(
            &key(),
            MSG_ID,
            &(TIMESTAMP + 1).to_string(),
            EXPECTED_SIGNATURE,
            BODY,
            TIMESTAMP,
            DEFAULT_TOLERANCE_SECS,
        );
        assert_eq!(result, Err(VerifyError::NoMatchingSignature));
    }

    #[test]
    fn verify_rejects_stale_timestamp() {
        assert_eq!(
            verify_at(&key(), EXPECTED_SIGNATURE, TIMESTAMP + 301),
            Err(VerifyError::TimestampTooOld)
        );
    }

    #[test]
    fn verify_rejects_future_timestamp() {
        assert_eq!(
            verify_at(&key(), EXPECTED_SIGNATURE, TIMESTAMP - 301),
            Err(VerifyError::TimestampTooNew)
        );
    }

    #[test]
    fn verify_accepts_timestamp_exactly_at_tolerance() {
        assert_eq!(
            verify_at(&key(), EXPECTED_SIGNATURE, TIMESTAMP + 300),
            Ok(())
        );
        assert_eq!(
            verify_at(&key(), EXPECTED_SIGNATURE, TIMESTAMP - 300),
            Ok(())
        );
    }

    #[test]
    fn verify_rejects_non_numeric_timestamp() {
        for bad in ["abc", "1614265330.5", "1614265330x", "99999999999999999999"] {
            let result = verify(
                &key(),
                MSG_ID,
                bad,
                EXPECTED_SIGNATURE,
                BODY,
                TIMESTAMP,
                DEFAULT_TOLERANCE_SECS,
            );
            assert_eq!(result, Err(VerifyError::InvalidTimestamp), "{bad}");
        }
    }

    #[test]
    fn verify_extreme_timestamps_do_not_overflow() {
        let key = key();
        for (timestamp, now, expected) in [
            (i64::MIN, i64::MAX, VerifyError::TimestampTooOld),
            (i64::MAX, i64::MIN, VerifyError::TimestampTooNew),
        ] {
            let result = verify(
                &key,
                MSG_ID,
                &timestamp.to_string(),
                EXPECTED_SIGNATURE,
                BODY,
                now,
                DEFAULT_TOLERANCE_SECS,
            );
            assert_eq!(result, Err(expected));
        }
    }

    #[test]
    fn verify_reports_missing_headers() {
        let key = key();
        let ts = TIMESTAMP.to_string();
        let check = |msg_id: &str, timestamp: &str, signature: &str| {
            verify(
                &key,
                msg_id,
                timestamp,
                signature,
                BODY,
                TIMESTAMP,
                DEFAULT_TOLERANCE_SECS,
            )
        };
        assert_eq!(
            check("", &ts, EXPECTED_SIGNATURE),
            Err(VerifyError::MissingHeader("webhook-id"))
        );
        assert_eq!(
            check(MSG_ID, " ", EXPECTED_SIGNATURE),
            Err(VerifyError::MissingHeader("webhook-timestamp"))
        );
        assert_eq!(
            check(MSG_ID, &ts, ""),
            Err(VerifyError::MissingHeader("webhook-signature"))
        );
    }

    #[test]
    fn verify_skips_malformed_entries_before_a_match() {
        let header = format!("garbage v1,not-base64!! v1, v1,AAAA {EXPECTED_SIGNATURE}");
        assert_eq!(verify_at(&key(), &header, TIMESTAMP), Ok(()));
    }

    #[test]
    fn rotated_header_verifies_with_either_key() {
        let old_key = key();
        let new_key = decode_secret("whsec_c2VjcmV0LWtleS1mb3Itcm90YXRpb24=").unwrap();
        let header = signature_header(&[&old_key, &new_key], MSG_ID, TIMESTAMP, BODY);

        assert_eq!(header.split(' ').count(), 2);
        assert!(header.starts_with(EXPECTED_SIGNATURE));
        assert_eq!(verify_at(&old_key, &header, TIMESTAMP), Ok(()));
        assert_eq!(verify_at(&new_key, &header, TIMESTAMP), Ok(()));

        let unrelated_key = b"unrelated".as_slice();
        assert_eq!(
            verify_at(unrelated_key, &header, TIMESTAMP),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn signature_header_with_no_keys_is_empty() {
        assert_eq!(signature_header(&[], MSG_ID, TIMESTAMP, BODY), "");
    }

    #[test]
    fn only_non_v1_entries_fail() {
        // A correct MAC under a different version prefix must not be accepted.
        let (_, encoded) = EXPECTED_SIGNATURE.split_once(',').unwrap();
        for version in ["v1a", "v2", "V1"] {
            let header = format!("{version},{encoded}");
            assert_eq!(
                verify_at(&key(), &header, TIMESTAMP),
                Err(VerifyError::NoMatchingSignature),
                "{header}"
            );
        }
    }

    #[test]
    fn decode_secret_accepts_with_and_without_prefix() {
        let with_prefix = decode_secret(SECRET).unwrap();
        let without_prefix = decode_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(with_prefix, without_prefix);
        assert_eq!(with_prefix.len(), 24);
        assert_eq!(decode_secret(&format!("{SECRET}\n")).unwrap(), with_prefix);
    }

    #[test]
    fn decode_secret_rejects_bad_input() {
        assert_eq!(decode_secret(""), Err(SecretDecodeError::Empty));
        assert_eq!(decode_secret("whsec_"), Err(SecretDecodeError::Empty));
        assert_eq!(
            decode_secret("whsec_not base64!"),
            Err(SecretDecodeError::InvalidBase64)
        );
    }
}
