//! The egress guard end to end, with loopback encodings only. Every sender in these tests is bound
//! to 127.0.0.1, so even a broken guard could not put a packet on any other address.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use tidings_core::egress::EgressPolicy;
use tidings_core::sender::HostResolver;
use tidings_tests::{TestReceiver, TestServer};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn strict_guard_refuses_every_loopback_spelling_and_logs_it() {
    let server = TestServer::start(|c| c.egress = EgressPolicy::strict()).await;
    let receiver = TestReceiver::start().await;
    let port = receiver.addr.port();
    let urls = [
        format!("http://127.0.0.1:{port}/v4"),
        format!("http://127.1:{port}/short"),
        format!("http://[::1]:{port}/v6"),
        format!("http://[::ffff:127.0.0.1]:{port}/mapped"),
        format!("http://localhost:{port}/name"),
    ];
    let mut subs = Vec::new();
    for url in &urls {
        subs.push(server.api.subscribe(url, &["a.b"]).await);
    }
    server.api.publish("a.b", json!({})).await;
    for sub in &subs {
        let list = server
            .api
            .wait_deliveries(sub["subscriptionId"].as_str().unwrap(), 1)
            .await;
        let id = list[0]["deliveryId"].as_str().unwrap();
        let d = server
            .api
            .wait_delivery(id, WAIT, |d| d["status"] == "failed")
            .await;
        let attempt = &d["attempts"][0];
        assert_eq!(attempt["outcome"], "permanent", "{d:#}");
        let error = attempt["error"].as_str().unwrap();
        assert!(
            error.contains("loopback"),
            "{} → {error}",
            sub["callbackUrl"]
        );
        assert!(attempt.get("statusCode").is_none());
    }
    assert!(
        receiver.received().is_empty(),
        "no request may reach the receiver"
    );
}

#[tokio::test]
async fn default_local_policy_lets_loopback_through() {
    let server = TestServer::start(|_| {}).await;
    let receiver = TestReceiver::start().await;
    server
        .api
        .subscribe(
            &format!("http://127.1:{}/short", receiver.addr.port()),
            &["a.b"],
        )
        .await;
    server.api.publish("a.b", json!({})).await;
    receiver.wait_for("/short", 1, WAIT).await;
}

/// Maps every name to the cloud metadata address, and counts lookups.
struct MetadataResolver(AtomicUsize);

impl HostResolver for MetadataResolver {
    fn resolve(
        &self,
        _host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + '_>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move { Ok(vec![SocketAddr::from(([169, 254, 169, 254], port))]) })
    }
}

#[tokio::test]
async fn a_name_resolving_to_the_metadata_address_is_refused_before_connecting() {
    let resolver = Arc::new(MetadataResolver(AtomicUsize::new(0)));
    let r = Arc::clone(&resolver);
    // Even the permissive local-development policy keeps metadata addresses out.
    let server = TestServer::start(move |c| c.resolver = r).await;
    let sub = server
        .api
        .subscribe("http://instance-data.test/latest/meta-data/", &["a.b"])
        .await;
    server.api.publish("a.b", json!({})).await;
    let list = server
        .api
        .wait_deliveries(sub["subscriptionId"].as_str().unwrap(), 1)
        .await;
    let d = server
        .api
        .wait_delivery(list[0]["deliveryId"].as_str().unwrap(), WAIT, |d| {
            d["status"] == "failed"
        })
        .await;
    // The tenant learns the kind of address the name resolves to, not the address.
    let error = d["attempts"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("instance-data.test") && error.contains("metadata"),
        "{error}"
    );
    assert!(!error.contains("169.254"), "{error}");
    assert_eq!(d["attempts"][0]["outcome"], "permanent");
    assert!(
        resolver.0.load(Ordering::SeqCst) >= 1,
        "the injected resolver was used"
    );
}
