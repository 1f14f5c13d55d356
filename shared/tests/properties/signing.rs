//! Signature headers: what is signed verifies, any change to what is signed does not, and no
//! header value or body makes `verify` panic or pass by accident.

use proptest::prelude::*;
use tidings_core::domain::Secret;
use tidings_core::signing::{
    DEFAULT_TOLERANCE_SECS, VerifyError, decode_secret, sign, signature_header, verify,
};

use crate::{config, text};

/// A key as secrets give them: 24 to 64 random bytes.
fn key() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 24..=64)
}

/// A `webhook-id`: ours (`dlv_…`), or any non-empty text a sender might use.
fn msg_id() -> impl Strategy<Value = String> {
    prop_oneof![
        "dlv_[0-9a-z]{26}",
        text(40).prop_filter("non-empty", |s| !s.is_empty()),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..300)
}

/// Seconds since the epoch, far enough from i64's ends that `now ± tolerance` stays in range.
fn timestamp() -> impl Strategy<Value = i64> {
    prop_oneof![0i64..4_102_444_800, (i64::MIN / 2)..(i64::MAX / 2),]
}

fn check(
    key: &[u8],
    id: &str,
    ts: i64,
    header: &str,
    body: &[u8],
    now: i64,
) -> Result<(), VerifyError> {
    verify(
        key,
        id,
        &ts.to_string(),
        header,
        body,
        now,
        DEFAULT_TOLERANCE_SECS,
    )
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn what_is_signed_verifies_within_the_tolerance(
        key in key(),
        id in msg_id(),
        ts in timestamp(),
        body in body(),
        skew in -DEFAULT_TOLERANCE_SECS..=DEFAULT_TOLERANCE_SECS,
    ) {
        let header = sign(&key, &id, ts, &body);
        prop_assert!(header.starts_with("v1,"));
        prop_assert_eq!(check(&key, &id, ts, &header, &body, ts), Ok(()));
        prop_assert_eq!(check(&key, &id, ts, &header, &body, ts + skew), Ok(()));
        // Outside the window, in either direction, it does not.
        prop_assert_eq!(
            check(&key, &id, ts, &header, &body, ts + DEFAULT_TOLERANCE_SECS + 1 + skew.abs()),
            Err(VerifyError::TimestampTooOld)
        );
        prop_assert_eq!(
            check(&key, &id, ts, &header, &body, ts - DEFAULT_TOLERANCE_SECS - 1 - skew.abs()),
            Err(VerifyError::TimestampTooNew)
        );
    }

    #[test]
    fn any_change_to_what_is_signed_fails(
        key in key(),
        other_key in key(),
        flip in (any::<prop::sample::Index>(), 1u8..=255),
        id in msg_id(),
        other_id in msg_id(),
        ts in timestamp(),
        other_ts in -DEFAULT_TOLERANCE_SECS..=DEFAULT_TOLERANCE_SECS,
        body in body(),
        other_body in body(),
    ) {
        let header = sign(&key, &id, ts, &body);
        if other_id != id {
            prop_assert_eq!(check(&key, &other_id, ts, &header, &body, ts), Err(VerifyError::NoMatchingSignature));
        }
        if other_body != body {
            prop_assert_eq!(check(&key, &id, ts, &header, &other_body, ts), Err(VerifyError::NoMatchingSignature));
        }
        // Another timestamp still inside the window: only the signature can refuse it.
        let moved = ts + other_ts;
        if moved != ts {
            prop_assert_eq!(check(&key, &id, moved, &header, &body, ts), Err(VerifyError::NoMatchingSignature));
        }
        // Another secret, and this one with any one byte changed.
        if other_key != key {
            prop_assert_eq!(check(&other_key, &id, ts, &header, &body, ts), Err(VerifyError::NoMatchingSignature));
        }
        let mut changed = key.clone();
        let i = flip.0.index(changed.len());
        changed[i] ^= flip.1;
        prop_assert_eq!(check(&changed, &id, ts, &header, &body, ts), Err(VerifyError::NoMatchingSignature));
        // The signature itself, with any one byte of its MAC changed.
        let mut tag = header.clone().into_bytes();
        let at = 3 + flip.0.index(tag.len() - 3);
        tag[at] = if tag[at] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tag).unwrap();
        if tampered != header {
            prop_assert!(check(&key, &id, ts, &tampered, &body, ts).is_err(), "{}", tampered);
        }
    }

    #[test]
    fn a_rotation_header_verifies_with_each_key_among_noise(
        keys in proptest::collection::vec(key(), 1..4),
        id in msg_id(),
        ts in timestamp(),
        body in body(),
        noise in proptest::collection::vec(
            prop_oneof![Just("v1,".to_owned()), Just("v1a,abc".to_owned()), Just("v2,Zm9v".to_owned()), "[!-~]{0,20}"],
            0..4,
        ),
    ) {
        let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let header = format!("{} {}", noise.join(" "), signature_header(&refs, &id, ts, &body));
        for key in &keys {
            prop_assert_eq!(check(key, &id, ts, &header, &body, ts), Ok(()));
        }
        prop_assert_eq!(
            check(&[7u8; 32], &id, ts, &header, &body, ts),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn any_headers_are_refused_cleanly(
        key in key(),
        id in text(40),
        ts_header in prop_oneof![text(30), "[+-]?[0-9]{1,25}", Just(String::new())],
        sig_header in prop_oneof![text(120), "(v1,[A-Za-z0-9+/=]{0,50} ?){0,3}"],
        body in body(),
        now in any::<i64>(),
        tolerance in any::<i64>(),
    ) {
        // Never panics; passes only with the right MAC, which random text does not have.
        let result = verify(&key, &id, &ts_header, &sig_header, &body, now, tolerance);
        prop_assert!(result.is_err(), "{:?} {:?} {:?} verified", id, ts_header, sig_header);
    }

    #[test]
    fn secrets_decode_to_their_key(key in key()) {
        use base64::Engine as _;
        let text = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(&key));
        let secret = Secret::parse(&text).unwrap();
        prop_assert_eq!(decode_secret(secret.expose()), Ok(key.clone()));
        prop_assert_eq!(decode_secret(&format!(" {text}\n")), Ok(key));
    }

    #[test]
    fn any_secret_text_decodes_or_is_refused(s in text(100)) {
        let _ = decode_secret(&s);
    }
}
