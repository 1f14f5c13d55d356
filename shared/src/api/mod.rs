//! The HTTP API: one axum `Router`, served by `tidings serve` locally and by the `api` Lambda
//! through `lambda_http`, unchanged.

pub use crate::input::{Problem, body, problem};

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::app::App;
use crate::domain::{
    Attempt, Delivery, DeliveryId, Event, EventId, EventTypePattern, Subscription, SubscriptionId,
    TenantId, Timestamp,
};
use crate::ports::{Clock, DeliveryQueue, Page, PageRequest, Store};

/// Request bodies beyond this are refused with 413 before they are parsed.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Largest `POST /events/batch` body: a hundred events of up to 10 KiB each, about.
pub const MAX_BATCH_BODY_BYTES: usize = 1024 * 1024;

pub struct ApiState<S, Q, C> {
    pub app: Arc<App<S, Q, C>>,
}

impl<S, Q, C> Clone for ApiState<S, Q, C> {
    fn clone(&self) -> Self {
        Self {
            app: Arc::clone(&self.app),
        }
    }
}

pub fn router<S: Store, Q: DeliveryQueue, C: Clock>(app: Arc<App<S, Q, C>>) -> Router {
    Router::new()
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route(
            "/webhook-subscriptions",
            post(create_subscription::<S, Q, C>).get(list_subscriptions::<S, Q, C>),
        )
        .route(
            "/webhook-subscriptions/{subscription_id}",
            get(get_subscription::<S, Q, C>)
                .patch(update_subscription::<S, Q, C>)
                .delete(delete_subscription::<S, Q, C>),
        )
        .route(
            "/webhook-subscriptions/{subscription_id}/secret",
            get(get_subscription_secret::<S, Q, C>),
        )
        .route(
            "/webhook-subscriptions/{subscription_id}/deliveries",
            get(list_deliveries::<S, Q, C>),
        )
        .route("/events", post(publish_event::<S, Q, C>))
        .route(
            "/events/batch",
            post(publish_batch::<S, Q, C>).layer(DefaultBodyLimit::max(MAX_BATCH_BODY_BYTES)),
        )
        .route("/events/{event_id}", get(get_event::<S, Q, C>))
        .route("/deliveries/{delivery_id}", get(get_delivery::<S, Q, C>))
        .route(
            "/deliveries/{delivery_id}/retry",
            post(retry_delivery::<S, Q, C>),
        )
        .fallback(|| async { Problem::not_found("route") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(ApiState { app })
}

/// The caller's tenant, from `Authorization: Bearer <key>`.
pub struct Tenant(pub TenantId);

impl<S: Store, Q: DeliveryQueue, C: Clock> FromRequestParts<ApiState<S, Q, C>> for Tenant {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ApiState<S, Q, C>,
    ) -> Result<Self, Self::Rejection> {
        let key = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .ok_or_else(Problem::unauthorized)?;
        match state.app.authenticate(key).await {
            Ok(Some(tenant)) => Ok(Tenant(tenant)),
            Ok(None) => Err(Problem::unauthorized()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The token of an `Authorization` value in the `Bearer` scheme, whose name is
/// case-insensitive (RFC 9110 §11.1), as any client may spell it.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains(' '))
        .then_some(token)
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Problem> {
    body_within(body, MAX_BODY_BYTES)
}

fn body_within(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, Problem> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::too_large(limit)
        } else {
            Problem::malformed(e.body_text())
        }
    })
}

// ---- wire types (camelCase JSON) ----

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SubscriptionDto<'a> {
    subscription_id: &'a SubscriptionId,
    event_types: &'a [EventTypePattern],
    callback_url: &'a str,
    description: &'a str,
    status: &'static str,
    created_at: Timestamp,
    updated_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<&'a str>,
}

impl<'a> SubscriptionDto<'a> {
    fn new(s: &'a Subscription, with_secret: bool) -> Self {
        Self {
            subscription_id: &s.id,
            event_types: &s.event_types,
            callback_url: s.callback_url.as_str(),
            description: &s.description,
            status: s.status.as_str(),
            created_at: s.created_at,
            updated_at: s.updated_at,
            secret: with_secret.then(|| s.secret.expose()),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AttemptDto<'a> {
    attempt: u32,
    at: Timestamp,
    outcome: crate::retry::AttemptClass,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_code: Option<u16>,
    latency_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_snippet: Option<&'a str>,
}

impl<'a> From<&'a Attempt> for AttemptDto<'a> {
    fn from(a: &'a Attempt) -> Self {
        Self {
            attempt: a.number,
            at: a.started_at,
            outcome: a.outcome,
            status_code: a.status_code,
            latency_ms: a.latency_ms,
            error: a.error.as_deref(),
            response_snippet: a.response_snippet.as_deref(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeliveryDto<'a> {
    delivery_id: &'a DeliveryId,
    event_id: &'a EventId,
    subscription_id: &'a SubscriptionId,
    status: &'static str,
    /// Every attempt made; `attempts` keeps the last few.
    attempt_count: u32,
    resend_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_attempt_at: Option<Timestamp>,
    /// Why it is held, or ended without an attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    attempts: Vec<AttemptDto<'a>>,
    created_at: Timestamp,
    updated_at: Timestamp,
}

impl<'a> From<&'a Delivery> for DeliveryDto<'a> {
    fn from(d: &'a Delivery) -> Self {
        Self {
            delivery_id: d.id(),
            event_id: d.event_id(),
            subscription_id: d.subscription_id(),
            status: d.status().as_str(),
            attempt_count: d.attempt_count(),
            resend_count: d.resends(),
            next_attempt_at: d.next_attempt_at(),
            reason: d.reason(),
            attempts: d.attempts().iter().map(AttemptDto::from).collect(),
            created_at: d.created_at(),
            updated_at: d.updated_at(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EventDto<'a> {
    event_id: &'a EventId,
    event_type: &'a str,
    occurred_at: Timestamp,
    received_at: Timestamp,
    data: &'a RawValue,
}

impl<'a> From<&'a Event> for EventDto<'a> {
    fn from(e: &'a Event) -> Self {
        Self {
            event_id: &e.id,
            event_type: e.event_type.as_str(),
            occurred_at: e.occurred_at,
            received_at: e.received_at,
            data: &e.data,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListDto<T> {
    data: Vec<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

/// A page as the API answers it. The cursor names the tenant it was handed to, so another
/// tenant's cursor is refused rather than read as a place in this tenant's list.
fn list<'a, T, D>(tenant: &TenantId, page: &'a Page<T>, f: impl Fn(&'a T) -> D) -> ListDto<D> {
    ListDto {
        data: page.items.iter().map(f).collect(),
        next_cursor: page
            .next
            .as_ref()
            .map(|c| URL_SAFE_NO_PAD.encode(format!("{tenant}:{c}"))),
    }
}

/// `?limit=&cursor=` of a list, read pair by pair so that a refusal names the parameter at
/// fault (serde's "duplicate field `cursor`" was reported as a bad `limit`). Other parameters
/// are ignored; an empty cursor is none (the first page). A cursor is one [`list`] handed to
/// `tenant`; the store checks the rest.
fn list_query(raw: Option<&str>, tenant: &TenantId) -> Result<PageRequest, Problem> {
    let mut limit = None;
    let mut cursor = None;
    for (name, value) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "limit" => {
                let n = value.parse::<u32>().map_err(|_| {
                    Problem::invalid("limit", format!("`{value}` is not a number of items"))
                })?;
                if limit.replace(n).is_some() {
                    return Err(Problem::invalid("limit", "is given more than once"));
                }
            }
            "cursor" => {
                let after = if value.is_empty() {
                    None
                } else {
                    let decoded = URL_SAFE_NO_PAD
                        .decode(value.as_bytes())
                        .ok()
                        .and_then(|b| String::from_utf8(b).ok())
                        .and_then(|c| {
                            c.strip_prefix(&format!("{tenant}:"))
                                .filter(|c| !c.is_empty())
                                .map(str::to_owned)
                        })
                        .ok_or_else(|| {
                            Problem::invalid("cursor", "is not a cursor this API returned")
                        })?;
                    Some(decoded)
                };
                if cursor.replace(after).is_some() {
                    return Err(Problem::invalid("cursor", "is given more than once"));
                }
            }
            _ => {}
        }
    }
    Ok(PageRequest {
        limit: limit.unwrap_or(0),
        after: cursor.flatten(),
    })
}

// Unknown or malformed ids are simply not found: no id leaks whether it exists elsewhere.
fn subscription_id(raw: &str) -> Result<SubscriptionId, Problem> {
    SubscriptionId::parse(raw).map_err(|_| Problem::not_found("subscription"))
}

fn delivery_id(raw: &str) -> Result<DeliveryId, Problem> {
    DeliveryId::parse(raw).map_err(|_| Problem::not_found("delivery"))
}

// ---- handlers ----

async fn create_subscription<S: Store, Q: DeliveryQueue, C: Clock>(
    State(state): State<ApiState<S, Q, C>>,
    Tenant(tenant): Tenant,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let new = body::parse_new_subscription(&body_bytes(body)?)?;
    let sub = state.app.create_subscription(&tenant, new).await?;
    let location = format!("/webhook-subscriptions/{}", sub.id);
    let mut response =
        (StatusCode::CREATED, Json(SubscriptionDto::new(&sub, true))).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

async fn list_subscriptions<S: Store, Q: DeliveryQueue, C: Clock>(
    State(state): State<ApiState<S, Q, C>>,
    Tenant(tenant): Tenant,
    RawQuery(query): RawQuery,
) -> Result<Response, Problem> {
    let page = state
        .app
        .list_subscriptions(&tenant, list_query(query.as_deref(), &tenant)?)
        .await?;
    Ok(Json(list(&tenant, &page, |s| SubscriptionDto::new(s, false))).into_response())
}

async fn get_subscription<S: Store, Q: DeliveryQueue, C: Clock>(
    State(state): State<ApiState<S, Q, C>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let sub = state
        .app
        .get_subscription(&tenant, &subscription_id(&id)?)
        .await?;
    Ok(Json(SubscriptionDto::new(&sub, false)).into_response())
}

async fn get_subscription_secret<S: Store, Q: DeliveryQueue, C: Clock>(
    State(state): State<ApiState<S, Q, C>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let sub = state
        .app
        .get_subscription(&tenant, &subscription_id(&id)?)
        .await?;
    Ok(Json(serde_json::json!({ "secret": sub.secret.expose() })).into_response())
}

async fn update_subscription<S: Store, Q: DeliveryQueue, C: Clock>(
    State(state): State<ApiState<S, Q, C>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let id = subscription_id(&id)?;
    let patch = body::parse_subscription_patch(&body_bytes(body)?)?;
    let sub = state.app.update_subscription(&tenant, &id, patch).await?;
    Ok(Json(SubscriptionDto::new(&sub, false)).into_response())
}

async fn delete_subscription<S: Store, Q: DeliveryQueue, C: Clock>(
    State(state): State<ApiState<S, Q, C>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    state
        .app
        .delete_subscription(&tenant, &subscription_id(&id)?)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_deliveries<S: Store, Q: DeliveryQueue, C: Clock>(
    State(state): State<ApiState<S, Q, C>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, Problem> {
    let id = subscription_id(&id)?;
    let page = state
        .app
        .list_deliveries(&tenant, &id, list_query(query.as_deref(), &tenant)?)
        .await?;
    Ok(Json(list(&tenant, &page, DeliveryDto::from)).into_response())
}

async fn publish_event<S: Store, Q: DeliveryQueue, C: Clock>(
    State(state): State<ApiState<S, Q, C>>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let request = body::parse_publish(&body_bytes(body)?)?;
    let idempotency_key = headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .map(str::to_owned)
                .map_err(|_| Problem::invalid("Idempotency-Key", "must be visible ASCII"))
        })
        .transpose()?;
    let published = state
        .app
        .publish_event(&tenant, request, idempotency_key)
        .await?;
    let mut response = (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "eventId": published.event_id })),
    )
        .into_response();
    if !published.created {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// One result per item of a batch publish, in order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BatchResultDto {
    /// As `POST /events` would have answered this event alone.
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<EventId>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    idempotent_replayed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<Problem>,
}

impl BatchResultDto {
    fn failed(problem: Problem) -> Self {
        Self {
            status: problem.status,
            event_id: None,
            idempotent_replayed: false,
            problem: Some(problem),
        }
    }
}

async fn publish_batch<S: Store, Q: DeliveryQueue, C: Clock>(
    State(state): State<ApiState<S, Q, C>>,
    Tenant(tenant): Tenant,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let parsed = body::parse_publish_batch(&body_within(body, MAX_BATCH_BODY_BYTES)?)?;
    let mut results: Vec<Option<BatchResultDto>> = Vec::with_capacity(parsed.len());
    let mut valid = Vec::new();
    for item in parsed {
        match item {
            Ok(item) => {
                valid.push(item);
                results.push(None);
            }
            Err(problem) => results.push(Some(BatchResultDto::failed(problem))),
        }
    }
    let mut published = state.app.publish_batch(&tenant, valid).await?.into_iter();
    let results: Vec<BatchResultDto> = results
        .into_iter()
        .enumerate()
        .map(|(i, result)| match result {
            Some(failed) => failed,
            None => match published.next() {
                Some(Ok(p)) => BatchResultDto {
                    status: 202,
                    event_id: Some(p.event_id),
                    idempotent_replayed: !p.created,
                    problem: None,
                },
                Some(Err(e)) => {
                    BatchResultDto::failed(Problem::from(e).within(&format!("events[{i}]")))
                }
                None => BatchResultDto::failed(Problem::unavailable()),
            },
        })
        .collect();
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "results": results })),
    )
        .into_response())
}

async fn get_event<S: Store, Q: DeliveryQueue, C: Clock>(
    State(state): State<ApiState<S, Q, C>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let id = EventId::parse(&id).map_err(|_| Problem::not_found("event"))?;
    let event = state.app.get_event(&tenant, &id).await?;
    Ok(Json(EventDto::from(&event)).into_response())
}

async fn get_delivery<S: Store, Q: DeliveryQueue, C: Clock>(
    State(state): State<ApiState<S, Q, C>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let delivery = state.app.get_delivery(&tenant, &delivery_id(&id)?).await?;
    Ok(Json(DeliveryDto::from(&delivery)).into_response())
}

async fn retry_delivery<S: Store, Q: DeliveryQueue, C: Clock>(
    State(state): State<ApiState<S, Q, C>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let delivery = state
        .app
        .resend_delivery(&tenant, &delivery_id(&id)?)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(DeliveryDto::from(&delivery))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acme() -> TenantId {
        TenantId::parse("acme").unwrap()
    }

    fn field_of(query: &str) -> Option<String> {
        list_query(Some(query), &acme()).err().and_then(|p| p.field)
    }

    fn cursor(text: &str) -> String {
        URL_SAFE_NO_PAD.encode(text)
    }

    #[test]
    fn the_bearer_scheme_is_read_whatever_its_case() {
        for value in [
            "Bearer k1",
            "bearer k1",
            "BEARER k1",
            "Bearer   k1 ",
            " Bearer k1",
        ] {
            assert_eq!(bearer_token(value), Some("k1"), "{value:?}");
        }
        for value in [
            "Bearer",
            "Bearer ",
            "Basic k1",
            "Bearerk1",
            "Bearer k1 k2",
            "k1",
            "",
        ] {
            assert_eq!(bearer_token(value), None, "{value:?}");
        }
    }

    #[test]
    fn a_bad_list_parameter_is_the_one_named() {
        // Found by the property tests: a repeated `cursor` was reported as a bad `limit`.
        let (a, b) = (cursor("acme:a"), cursor("acme:b"));
        assert_eq!(
            field_of(&format!("cursor={a}&cursor={b}")).as_deref(),
            Some("cursor")
        );
        assert_eq!(field_of("limit=1&limit=2").as_deref(), Some("limit"));
        assert_eq!(field_of("limit=-1").as_deref(), Some("limit"));
        assert_eq!(
            field_of(&format!("limit=&cursor={a}")).as_deref(),
            Some("limit")
        );
        assert_eq!(field_of("limit=2&cursor=%ff").as_deref(), Some("cursor"));
        assert_eq!(field_of("limit=4294967296").as_deref(), Some("limit"));
    }

    #[test]
    fn list_parameters_are_read() {
        let query = format!("limit=7&cursor={}&other=%ff", cursor("acme:sub_x"));
        let page = list_query(Some(&query), &acme()).unwrap();
        assert_eq!((page.limit, page.after.as_deref()), (7, Some("sub_x")));
        let page = list_query(None, &acme()).unwrap();
        assert_eq!((page.limit, page.after), (0, None));
        let page = list_query(Some("cursor="), &acme()).unwrap();
        assert_eq!(page.after, None, "an empty cursor is the first page");
    }

    #[test]
    fn a_cursor_is_the_tenants_it_was_handed_to() {
        let page = Page {
            items: vec![1],
            next: Some("sub_x".to_owned()),
        };
        let handed = list(&acme(), &page, |i| *i).next_cursor.unwrap();
        let query = format!("cursor={handed}");
        let read = list_query(Some(&query), &acme()).unwrap();
        assert_eq!(read.after.as_deref(), Some("sub_x"));
        let other = TenantId::parse("acme-2").unwrap();
        let refused = list_query(Some(&query), &other).unwrap_err();
        assert_eq!(refused.field.as_deref(), Some("cursor"));
        // Nor a store cursor without its tenant, as the API handed them out before.
        for query in [cursor("sub_x"), cursor("acme:")] {
            let query = format!("cursor={query}");
            assert_eq!(field_of(&query).as_deref(), Some("cursor"), "{query}");
        }
    }
}
