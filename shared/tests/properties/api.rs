//! The HTTP API's query parameters (`limit`, `cursor`) and path ids, through the router over
//! the SQLite store: any query is a page or a 422 naming the parameter, never a 5xx; `limit` is
//! clamped as documented; handed-out cursors page through every subscription once, and only
//! for the tenant they were handed to.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use proptest::prelude::*;
use serde_json::Value;
use tidings_core::app::{App, AppConfig, DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT};
use tidings_core::domain::{TenantId, Timestamp};
use tidings_core::local::LocalQueue;
use tidings_core::ports::FakeClock;
use tidings_core::sqlite::SqliteStore;
use tower::ServiceExt as _;

use crate::store::{check, runtime};
use crate::text;

const KEY: &str = "tdk_property-tests-key-0123456789";
/// Another tenant's key.
const OTHER_KEY: &str = "tdk_property-tests-key-other-0123";
/// Subscriptions the tenant has: more than one default page.
const SUBSCRIPTIONS: usize = 60;

struct Api {
    router: Router,
    subscription: String,
}

impl Api {
    async fn new() -> Self {
        let store = SqliteStore::open_in_memory().unwrap();
        let (queue, _jobs) = LocalQueue::new();
        let clock = FakeClock::at(Timestamp::from_unix_millis(1_700_000_000_000));
        let app = Arc::new(App::new(store, queue, clock, AppConfig::default()));
        let tenant = TenantId::parse("acme").unwrap();
        app.add_api_key(&tenant, KEY).await.unwrap();
        let other = TenantId::parse("other").unwrap();
        app.add_api_key(&other, OTHER_KEY).await.unwrap();
        let api = Self {
            router: tidings_core::api::router(app),
            subscription: String::new(),
        };
        let mut subscription = String::new();
        for i in 0..SUBSCRIPTIONS {
            let body = format!(r#"{{"eventType":"t{i}","callbackUrl":"https://x.example/{i}"}}"#);
            let (status, json) = api.call("POST", "/webhook-subscriptions", body).await;
            assert_eq!(status, StatusCode::CREATED, "{json}");
            subscription = json["subscriptionId"].as_str().unwrap().to_owned();
        }
        Self {
            subscription,
            ..api
        }
    }

    async fn call(&self, method: &str, uri: &str, body: String) -> (StatusCode, Value) {
        self.call_as(KEY, method, uri, body).await
    }

    async fn call_as(
        &self,
        key: &str,
        method: &str,
        uri: &str,
        body: String,
    ) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.call("GET", uri, String::new()).await
    }
}

/// Percent-encodes every byte outside the unreserved set, so any text fits in a URI.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Query strings: `limit` and `cursor` with any values (encoded or raw, repeated, invalid
/// escapes), other parameters, and any text.
fn query() -> impl Strategy<Value = String> {
    let limit = prop_oneof![
        any::<u32>().prop_map(|n| n.to_string()),
        prop::sample::select(vec![
            "-1",
            "1.5",
            "",
            "4294967296",
            "99999999999999999999",
            "0x10",
            "+5",
            " 5",
            "abc"
        ])
        .prop_map(str::to_owned),
        text(10).prop_map(|s| encode(&s)),
    ];
    let cursor = prop_oneof![
        text(40).prop_map(|s| encode(&s)),
        "[A-Za-z0-9_-]{0,40}",
        prop::sample::select(vec!["%ff", "%zz", "%", "====", "c3ViXw", "c3ViXzAx"])
            .prop_map(str::to_owned),
    ];
    let pair = prop_oneof![
        limit.prop_map(|v| format!("limit={v}")),
        cursor.prop_map(|v| format!("cursor={v}")),
        prop::sample::select(vec!["limit", "cursor", "x=1", "", "&", "=", "a=%ff"])
            .prop_map(str::to_owned),
    ];
    prop_oneof![
        proptest::collection::vec(pair, 0..4).prop_map(|pairs| pairs.join("&")),
        "[!-~]{0,30}".prop_map(|s| s.replace('#', "%23")),
    ]
}

fn clamped(limit: u32) -> usize {
    (if limit == 0 {
        DEFAULT_PAGE_LIMIT
    } else {
        limit.min(MAX_PAGE_LIMIT)
    }) as usize
}

#[test]
fn any_query_is_a_page_or_names_its_parameter() {
    let rt = runtime();
    let api = rt.block_on(Api::new());
    check(256, query(), |query| {
        rt.block_on(async {
            for path in [
                "/webhook-subscriptions".to_owned(),
                format!("/webhook-subscriptions/{}/deliveries", api.subscription),
            ] {
                let uri = format!("{path}?{query}");
                let Ok(uri) = uri.parse::<axum::http::Uri>() else {
                    return Ok(()); // not a URI a client could send
                };
                let (status, json) = api.get(&uri.to_string()).await;
                match status {
                    StatusCode::OK => prop_assert!(json["data"].is_array(), "{}", json),
                    StatusCode::UNPROCESSABLE_ENTITY => {
                        // The parameter named is one the query has.
                        let field = json["field"].as_str().unwrap_or_default();
                        let given = query
                            .split('&')
                            .any(|pair| pair.split('=').next() == Some(field));
                        prop_assert!(
                            ["limit", "cursor"].contains(&field) && given,
                            "{} answered {}",
                            uri,
                            json
                        );
                    }
                    other => prop_assert!(false, "{} answered {} {}", uri, other, json),
                }
            }
            Ok(())
        })
    });
}

#[test]
fn limit_is_clamped_and_pages_follow_their_cursors() {
    let rt = runtime();
    let api = rt.block_on(Api::new());
    check(32, prop_oneof![0u32..=70, Just(u32::MAX)], |limit| {
        rt.block_on(async {
            let mut seen = Vec::new();
            let mut uri = format!("/webhook-subscriptions?limit={limit}");
            for _ in 0..=SUBSCRIPTIONS {
                let (status, json) = api.get(&uri).await;
                prop_assert_eq!(status, StatusCode::OK, "{}", json);
                let items = json["data"].as_array().unwrap();
                prop_assert!(items.len() <= clamped(limit));
                seen.extend(
                    items
                        .iter()
                        .map(|s| s["subscriptionId"].as_str().unwrap().to_owned()),
                );
                match json["nextCursor"].as_str() {
                    Some(cursor) => {
                        uri = format!("/webhook-subscriptions?limit={limit}&cursor={cursor}");
                        // Handed to this tenant: another tenant's request with it is refused.
                        let (status, json) =
                            api.call_as(OTHER_KEY, "GET", &uri, String::new()).await;
                        prop_assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{}", json);
                        prop_assert_eq!(json["field"].as_str(), Some("cursor"));
                    }
                    None => break,
                }
            }
            prop_assert_eq!(seen.len(), SUBSCRIPTIONS, "every subscription once");
            let mut sorted = seen.clone();
            sorted.sort();
            sorted.dedup();
            prop_assert_eq!(sorted, seen, "oldest first, no repeats");
            Ok(())
        })
    });
}

#[test]
fn any_path_id_is_found_or_not_found() {
    let rt = runtime();
    let api = rt.block_on(Api::new());
    let id = prop_oneof![text(40), "(sub_|dlv_|evt_)[0-9A-Za-z]{0,30}"];
    check(128, id, |id| {
        rt.block_on(async {
            let id = encode(&id);
            for path in [
                format!("/webhook-subscriptions/{id}"),
                format!("/webhook-subscriptions/{id}/deliveries"),
                format!("/events/{id}"),
                format!("/deliveries/{id}"),
            ] {
                let (status, json) = api.get(&path).await;
                prop_assert!(
                    status == StatusCode::NOT_FOUND || status == StatusCode::OK,
                    "{} answered {} {}",
                    path,
                    status,
                    json
                );
            }
            Ok(())
        })
    });
}
