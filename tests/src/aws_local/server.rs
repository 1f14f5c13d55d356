//! The one HTTP server on `--listen`: API Gateway for the `api` function, and the admin endpoints
//! under `/_aws_local` (a prefix the Tidings API never uses).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::Info;
use super::apigw::{self, RequestContext};
use super::meter::Meter;
use super::runtime::{Function, InvokeError};
use super::schedule::Schedule;
use super::sqs::EventSourceMapping;
use super::streams::StreamMapping;

/// API Gateway's payload limit for HTTP APIs.
const MAX_REQUEST_BYTES: usize = 10 * 1024 * 1024;
/// Lambda's limit for a synchronous invocation's event.
const MAX_EVENT_BYTES: usize = 6 * 1024 * 1024;
/// HTTP APIs give up on an integration after 30 s at most (503).
const INTEGRATION_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Shared {
    pub info: Info,
    pub account_id: String,
    pub api_id: String,
    pub listen_port: u16,
    pub api: Arc<Function>,
    pub functions: Vec<Arc<Function>>,
    pub mappings: Vec<Arc<EventSourceMapping>>,
    pub stream_mappings: Vec<Arc<StreamMapping>>,
    pub sweep: Arc<Schedule>,
    pub meter: Arc<Meter>,
}

pub fn router(shared: Arc<Shared>) -> Router {
    let admin = Router::new()
        .route("/", get(info))
        .route("/functions", get(functions))
        .route("/functions/{name}/kill", post(kill_all))
        .route("/functions/{name}/{instance}/kill", post(kill_one))
        .route("/queues", get(queues))
        .route("/streams", get(streams))
        .route("/sweep", post(sweep))
        .route("/meter", get(meter))
        .route("/meter/reset", post(reset_meter))
        .route("/meter/partitions", get(partitions))
        .route("/faults", get(faults).put(set_faults));
    Router::new()
        .nest("/_aws_local", admin)
        .fallback(api_gateway)
        .with_state(shared)
}

async fn api_gateway(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(source): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let request_id = BASE64.encode(rand::random::<[u8; 10]>());
    let (parts, body) = request.into_parts();
    let mut response = match axum::body::to_bytes(body, MAX_REQUEST_BYTES).await {
        Err(_) => apigw::gateway_error(StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large"),
        Ok(body) => {
            let ctx = RequestContext {
                account_id: shared.account_id.clone(),
                api_id: shared.api_id.clone(),
                request_id: request_id.clone(),
                source,
                listen_port: shared.listen_port,
                now: OffsetDateTime::now_utc(),
            };
            let event = apigw::request_event(
                &parts.method,
                &parts.uri,
                parts.version,
                &parts.headers,
                &body,
                &ctx,
            );
            invoke_api(&shared, serde_json::to_vec(&event).unwrap_or_default()).await
        }
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("apigw-requestid", value);
    }
    response
}

async fn invoke_api(shared: &Shared, event: Vec<u8>) -> Response {
    if event.len() > MAX_EVENT_BYTES {
        return apigw::gateway_error(StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large");
    }
    match shared.api.invoke(event, INTEGRATION_TIMEOUT).await {
        Ok(payload) => apigw::http_response(&payload).unwrap_or_else(|error| {
            tracing::warn!(%error, "api returned a malformed response: 502");
            apigw::gateway_error(StatusCode::BAD_GATEWAY, "Internal Server Error")
        }),
        Err(InvokeError::Unavailable(_)) => {
            apigw::gateway_error(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable")
        }
        Err(error) => {
            tracing::warn!(%error, "api invocation failed: 502");
            apigw::gateway_error(StatusCode::BAD_GATEWAY, "Internal Server Error")
        }
    }
}

async fn info(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(&shared.info).into_response()
}

async fn functions(State(shared): State<Arc<Shared>>) -> Response {
    let rows: Vec<_> = shared.functions.iter().flat_map(|f| f.stats()).collect();
    axum::Json(rows).into_response()
}

fn find<'a>(shared: &'a Shared, name: &str) -> Option<&'a Arc<Function>> {
    shared.functions.iter().find(|f| f.name() == name)
}

async fn kill_all(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    match find(&shared, &name) {
        Some(function) => axum::Json(json!({ "killed": function.kill(None) })).into_response(),
        None => not_found(&name),
    }
}

async fn kill_one(
    State(shared): State<Arc<Shared>>,
    Path((name, instance)): Path<(String, usize)>,
) -> Response {
    match find(&shared, &name) {
        Some(function) => {
            axum::Json(json!({ "killed": function.kill(Some(instance)) })).into_response()
        }
        None => not_found(&name),
    }
}

async fn queues(State(shared): State<Arc<Shared>>) -> Response {
    let rows: Vec<_> = shared.mappings.iter().map(|m| m.snapshot()).collect();
    axum::Json(rows).into_response()
}

async fn streams(State(shared): State<Arc<Shared>>) -> Response {
    let rows: Vec<_> = shared
        .stream_mappings
        .iter()
        .map(|m| m.snapshot())
        .collect();
    axum::Json(rows).into_response()
}

/// DynamoDB and SQS usage by caller and operation since the start or the last reset.
async fn meter(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(shared.meter.snapshot()).into_response()
}

/// The busiest partition key's share of each kind of DynamoDB access since start.
async fn partitions(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(shared.meter.partition_shares()).into_response()
}

async fn reset_meter(State(shared): State<Arc<Shared>>) -> Response {
    shared.meter.reset();
    StatusCode::NO_CONTENT.into_response()
}

/// The faults the meter injects between the functions and the emulator, with their counters.
async fn faults(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(shared.meter.faults()).into_response()
}

async fn set_faults(
    State(shared): State<Arc<Shared>>,
    axum::Json(faults): axum::Json<super::meter::Faults>,
) -> Response {
    shared.meter.set_faults(faults);
    StatusCode::NO_CONTENT.into_response()
}

/// Fires the sweep schedule now and answers with the function's response.
async fn sweep(State(shared): State<Arc<Shared>>) -> Response {
    match shared.sweep.fire().await {
        Ok(payload) => {
            let response: Value = serde_json::from_slice(&payload)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&payload).into_owned()));
            axum::Json(json!({ "ok": true, "response": response })).into_response()
        }
        Err(error) => (
            StatusCode::BAD_GATEWAY,
            axum::Json(json!({ "ok": false, "error": error.to_string() })),
        )
            .into_response(),
    }
}

fn not_found(name: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({ "message": format!("no function named {name}") })),
    )
        .into_response()
}
