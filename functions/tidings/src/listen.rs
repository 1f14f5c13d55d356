//! A receiver for trying Tidings out: prints every delivery as one JSON line on stdout and checks
//! its Standard Webhooks signature when given the subscription's secret.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use tidings_core::domain::{Secret, Timestamp};
use tidings_core::signing;

#[derive(clap::Args)]
pub struct ListenArgs {
    /// Address to receive deliveries on; use it in the subscription's callbackUrl.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// The subscription's secret (`whsec_…`), to verify signatures.
    #[arg(long, env = "TIDINGS_LISTEN_SECRET", hide_env_values = true)]
    secret: Option<Secret>,
    /// Status code to answer with (try 500 to watch retries).
    #[arg(long, default_value_t = 204)]
    status: u16,
}

struct Listener {
    secret: Option<Secret>,
    status: StatusCode,
}

pub async fn run(args: ListenArgs) -> anyhow::Result<()> {
    let status = StatusCode::from_u16(args.status).context("--status")?;
    let state = Arc::new(Listener {
        secret: args.secret,
        status,
    });
    let router = Router::new().fallback(post(receive)).with_state(state);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    eprintln!(
        "listening on http://{} — POST deliveries to any path",
        listener.local_addr()?
    );
    axum::serve(listener, router).await?;
    Ok(())
}

async fn receive(
    State(state): State<Arc<Listener>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let verified = state.secret.as_ref().map(|secret| {
        signing::verify(
            secret.key(),
            header("webhook-id"),
            header("webhook-timestamp"),
            header("webhook-signature"),
            &body,
            Timestamp::now().unix_seconds(),
            signing::DEFAULT_TOLERANCE_SECS,
        )
        .map_err(|e| e.to_string())
    });
    let body_json: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into_owned()));
    let line = serde_json::json!({
        "webhookId": header("webhook-id"),
        "verified": match &verified { Some(Ok(())) => serde_json::json!(true), Some(Err(e)) => serde_json::json!(e), None => serde_json::Value::Null },
        "body": body_json,
    });
    println!("{line}");
    match verified {
        Some(Err(_)) => StatusCode::UNAUTHORIZED,
        _ => state.status,
    }
}
