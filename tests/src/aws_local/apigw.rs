//! API Gateway HTTP API with a Lambda proxy integration, payload format 2.0: an HTTP request
//! becomes an `APIGatewayV2httpRequest` event; the function's answer becomes the HTTP response.
//!
//! The field names follow `aws_lambda_events::apigw` (what `lambda_http` deserializes); the unit
//! tests check the events against those types.

use std::net::SocketAddr;

use axum::body::Body;
use axum::http::header::{CONTENT_TYPE, HeaderName, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, Version};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::macros::format_description;

/// What API Gateway knows about the API and the request, beyond the HTTP request itself.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub account_id: String,
    pub api_id: String,
    pub request_id: String,
    pub source: SocketAddr,
    /// The port the API listens on (for `x-forwarded-port`).
    pub listen_port: u16,
    pub now: OffsetDateTime,
}

/// The v2.0 event for one HTTP request.
pub fn request_event(
    method: &Method,
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
    body: &[u8],
    ctx: &RequestContext,
) -> Value {
    // Header names are lower-case already (`http` normalises them); repeats are joined with ",".
    // Cookies travel in `cookies`, not as a header, as API Gateway does.
    let mut header_map = Map::new();
    let mut cookies = Vec::new();
    for name in headers.keys() {
        let values: Vec<String> = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        if name == "cookie" {
            cookies.extend(
                values
                    .iter()
                    .flat_map(|v| v.split(';'))
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned),
            );
            continue;
        }
        header_map.insert(name.as_str().to_owned(), Value::String(values.join(",")));
    }
    let source_ip = ctx.source.ip().to_string();
    let forwarded_for = match header_map.get("x-forwarded-for").and_then(Value::as_str) {
        Some(existing) => format!("{existing}, {source_ip}"),
        None => source_ip.clone(),
    };
    header_map.insert("x-forwarded-for".into(), forwarded_for.into());
    header_map.insert(
        "x-forwarded-port".into(),
        ctx.listen_port.to_string().into(),
    );
    header_map.insert("x-forwarded-proto".into(), "http".into());
    header_map.insert(
        "x-amzn-trace-id".into(),
        format!(
            "Root=1-{:08x}-{:024x}",
            ctx.now.unix_timestamp(),
            rand::random::<u128>() >> 32
        )
        .into(),
    );

    let host = headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| format!("127.0.0.1:{}", ctx.listen_port));
    let domain_prefix = host.split(['.', ':']).next().unwrap_or_default().to_owned();
    let raw_query = uri.query().unwrap_or_default();
    let user_agent = headers
        .get("user-agent")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();

    let mut event = json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": uri.path(),
        "rawQueryString": raw_query,
        "headers": header_map,
        "requestContext": {
            "accountId": ctx.account_id,
            "apiId": ctx.api_id,
            "domainName": host,
            "domainPrefix": domain_prefix,
            "http": {
                "method": method.as_str(),
                "path": uri.path(),
                "protocol": protocol(version),
                "sourceIp": source_ip,
                "userAgent": user_agent,
            },
            "requestId": ctx.request_id,
            "routeKey": "$default",
            "stage": "$default",
            "time": ctx.now.format(format_description!(
                "[day]/[month repr:short]/[year]:[hour]:[minute]:[second] +0000"
            )).unwrap_or_default(),
            "timeEpoch": i64::try_from(ctx.now.unix_timestamp_nanos() / 1_000_000).unwrap_or_default(),
        },
        "isBase64Encoded": false,
    });
    if !cookies.is_empty() {
        event["cookies"] = json!(cookies);
    }
    let query = query_parameters(raw_query);
    if !query.is_empty() {
        event["queryStringParameters"] = Value::Object(query);
    }
    if !body.is_empty() {
        match std::str::from_utf8(body) {
            Ok(text) => event["body"] = text.into(),
            Err(_) => {
                event["body"] = BASE64.encode(body).into();
                event["isBase64Encoded"] = true.into();
            }
        }
    }
    event
}

/// `queryStringParameters`: decoded, repeated names joined with ",".
fn query_parameters(raw: &str) -> Map<String, Value> {
    let mut map = Map::new();
    for (name, value) in url::form_urlencoded::parse(raw.as_bytes()) {
        match map.get_mut(name.as_ref()) {
            Some(Value::String(existing)) => {
                existing.push(',');
                existing.push_str(&value);
            }
            _ => {
                map.insert(name.into_owned(), Value::String(value.into_owned()));
            }
        }
    }
    map
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// Why a function's answer could not be turned into an HTTP response (API Gateway: 502).
#[derive(Debug, thiserror::Error)]
#[error("malformed Lambda proxy response: {0}")]
pub struct MalformedResponse(String);

/// The HTTP response for a function's answer.
///
/// An object with `statusCode` is a structured response (`headers`, `multiValueHeaders`,
/// `cookies`, `body`, `isBase64Encoded`); any other JSON is the body of a `200` with
/// `content-type: application/json`, as API Gateway does for payload format 2.0.
pub fn http_response(payload: &[u8]) -> Result<Response, MalformedResponse> {
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| MalformedResponse(format!("not JSON: {e}")))?;
    let Some(status) = value.get("statusCode") else {
        let mut response = Response::new(Body::from(payload.to_vec()));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return Ok(response);
    };
    let status = status
        .as_u64()
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or_else(|| MalformedResponse(format!("bad statusCode {status}")))?;

    let body = match value.get("body") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(text)) => {
            if value["isBase64Encoded"].as_bool().unwrap_or(false) {
                BASE64
                    .decode(text)
                    .map_err(|e| MalformedResponse(format!("body is not base64: {e}")))?
            } else {
                text.clone().into_bytes()
            }
        }
        Some(other) => return Err(MalformedResponse(format!("body is not a string: {other}"))),
    };

    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Some(map) = value.get("headers").and_then(Value::as_object) {
        for (name, v) in map {
            headers.insert(header_name(name)?, header_value(v)?);
        }
    }
    if let Some(map) = value.get("multiValueHeaders").and_then(Value::as_object) {
        for (name, values) in map {
            let name = header_name(name)?;
            let values = values.as_array().ok_or_else(|| {
                MalformedResponse(format!("multiValueHeaders.{name} is not a list"))
            })?;
            for v in values {
                let v = header_value(v)?;
                if !headers.get_all(&name).iter().any(|existing| existing == v) {
                    headers.append(name.clone(), v);
                }
            }
        }
    }
    if let Some(cookies) = value.get("cookies").and_then(Value::as_array) {
        for cookie in cookies {
            headers.append(SET_COOKIE, header_value(cookie)?);
        }
    }
    Ok(response)
}

fn header_name(name: &str) -> Result<HeaderName, MalformedResponse> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| MalformedResponse(format!("bad header name {name:?}")))
}

fn header_value(value: &Value) -> Result<HeaderValue, MalformedResponse> {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(_) | Value::Bool(_) => value.to_string(),
        other => return Err(MalformedResponse(format!("bad header value {other}"))),
    };
    HeaderValue::from_str(&text)
        .map_err(|_| MalformedResponse(format!("bad header value {text:?}")))
}

/// API Gateway's own error answers: `{"message": …}`.
pub fn gateway_error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "message": message }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lambda_events::apigw::{ApiGatewayV2httpRequest, ApiGatewayV2httpResponse};
    use aws_lambda_events::encodings::Body as LambdaBody;

    fn ctx() -> RequestContext {
        RequestContext {
            account_id: "123456789012".into(),
            api_id: "abcdef1234".into(),
            request_id: "JKJaXmPLvHcESHA=".into(),
            source: "127.0.0.1:40000".parse().unwrap(),
            listen_port: 3000,
            now: OffsetDateTime::from_unix_timestamp(1_764_061_200).unwrap(),
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn a_request_becomes_a_v2_event_that_lambda_http_reads() {
        let uri: Uri = "/webhook-subscriptions?limit=2&tag=a&tag=b%20c"
            .parse()
            .unwrap();
        let h = headers(&[
            ("host", "127.0.0.1:3000"),
            ("authorization", "Bearer tdk_x"),
            ("content-type", "application/json"),
            ("accept", "text/plain"),
            ("accept", "application/json"),
            ("cookie", "a=1; b=2"),
            ("user-agent", "curl/8"),
        ]);
        let event = request_event(
            &Method::POST,
            &uri,
            Version::HTTP_11,
            &h,
            br#"{"eventType":"order.*"}"#,
            &ctx(),
        );

        assert_eq!(event["version"], "2.0");
        assert_eq!(event["routeKey"], "$default");
        assert_eq!(event["rawPath"], "/webhook-subscriptions");
        assert_eq!(event["rawQueryString"], "limit=2&tag=a&tag=b%20c");
        assert_eq!(event["headers"]["accept"], "text/plain,application/json");
        assert_eq!(event["headers"]["authorization"], "Bearer tdk_x");
        assert_eq!(event["headers"]["x-forwarded-for"], "127.0.0.1");
        assert_eq!(event["headers"]["x-forwarded-port"], "3000");
        assert!(event["headers"].get("cookie").is_none());
        assert_eq!(event["cookies"], json!(["a=1", "b=2"]));
        assert_eq!(
            event["queryStringParameters"],
            json!({"limit": "2", "tag": "a,b c"})
        );
        assert_eq!(event["body"], r#"{"eventType":"order.*"}"#);
        assert_eq!(event["isBase64Encoded"], false);
        let rc = &event["requestContext"];
        assert_eq!(rc["http"]["method"], "POST");
        assert_eq!(rc["http"]["path"], "/webhook-subscriptions");
        assert_eq!(rc["http"]["protocol"], "HTTP/1.1");
        assert_eq!(rc["http"]["sourceIp"], "127.0.0.1");
        assert_eq!(rc["http"]["userAgent"], "curl/8");
        assert_eq!(rc["stage"], "$default");
        assert_eq!(rc["routeKey"], "$default");
        assert_eq!(rc["domainName"], "127.0.0.1:3000");
        assert_eq!(rc["domainPrefix"], "127");
        assert_eq!(rc["time"], "25/Nov/2025:09:00:00 +0000");
        assert_eq!(rc["timeEpoch"], 1_764_061_200_000_i64);

        // What the function's runtime sees.
        let parsed: ApiGatewayV2httpRequest = serde_json::from_value(event).unwrap();
        assert_eq!(parsed.request_context.http.method, Method::POST);
        assert_eq!(parsed.raw_path.as_deref(), Some("/webhook-subscriptions"));
        assert_eq!(parsed.headers["accept"], "text/plain,application/json");
        assert_eq!(parsed.cookies, Some(vec!["a=1".into(), "b=2".into()]));
        assert_eq!(
            parsed.query_string_parameters.all("tag"),
            Some(vec!["a", "b c"])
        );
        assert_eq!(parsed.request_context.stage.as_deref(), Some("$default"));
        assert_eq!(parsed.request_context.time_epoch, 1_764_061_200_000);
        assert!(!parsed.is_base64_encoded);
    }

    #[test]
    fn binary_bodies_are_base64_and_empty_bodies_absent() {
        let uri: Uri = "/events".parse().unwrap();
        let bytes = [0xff, 0x00, 0x80, b'a'];
        let event = request_event(
            &Method::POST,
            &uri,
            Version::HTTP_11,
            &HeaderMap::new(),
            &bytes,
            &ctx(),
        );
        assert_eq!(event["isBase64Encoded"], true);
        assert_eq!(event["body"], BASE64.encode(bytes));
        assert_eq!(
            BASE64.decode(event["body"].as_str().unwrap()).unwrap(),
            bytes
        );
        assert_eq!(event["requestContext"]["domainName"], "127.0.0.1:3000");
        let parsed: ApiGatewayV2httpRequest = serde_json::from_value(event).unwrap();
        assert!(parsed.is_base64_encoded);

        let event = request_event(
            &Method::GET,
            &uri,
            Version::HTTP_11,
            &HeaderMap::new(),
            b"",
            &ctx(),
        );
        assert!(event.get("body").is_none());
        assert!(event.get("queryStringParameters").is_none());
        assert!(event.get("cookies").is_none());
        assert_eq!(event["rawQueryString"], "");
    }

    async fn body_of(response: Response) -> Vec<u8> {
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec()
    }

    #[tokio::test]
    async fn a_lambda_http_response_maps_back_to_http() {
        // Built the way lambda_http builds it, serialized as the runtime sends it.
        let mut lambda = ApiGatewayV2httpResponse::default();
        lambda.status_code = 201;
        lambda
            .headers
            .insert("content-type", "application/json".parse().unwrap());
        lambda
            .headers
            .insert("location", "/webhook-subscriptions/sub_1".parse().unwrap());
        lambda.body = Some(LambdaBody::Text(r#"{"subscriptionId":"sub_1"}"#.into()));
        lambda.cookies = vec!["a=1; Path=/".into(), "b=2".into()];
        let payload = serde_json::to_vec(&lambda).unwrap();

        let response = http_response(&payload).unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(
            response.headers()["location"],
            "/webhook-subscriptions/sub_1"
        );
        let cookies: Vec<_> = response.headers().get_all(SET_COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; Path=/", "b=2"]);
        assert_eq!(body_of(response).await, br#"{"subscriptionId":"sub_1"}"#);
    }

    #[tokio::test]
    async fn base64_bodies_and_multi_value_headers() {
        let payload = json!({
            "statusCode": 200,
            "headers": {"content-type": "application/octet-stream", "x-one": 1},
            "multiValueHeaders": {"x-many": ["a", "b"], "content-type": ["application/octet-stream"]},
            "body": BASE64.encode([0xde, 0xad, 0xbe, 0xef]),
            "isBase64Encoded": true,
        });
        let response = http_response(payload.to_string().as_bytes()).unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let many: Vec<_> = response.headers().get_all("x-many").iter().collect();
        assert_eq!(many, ["a", "b"]);
        assert_eq!(response.headers()["x-one"], "1");
        assert_eq!(
            response.headers().get_all("content-type").iter().count(),
            1,
            "a value in both maps is sent once"
        );
        assert_eq!(body_of(response).await, [0xde, 0xad, 0xbe, 0xef]);
    }

    #[tokio::test]
    async fn plain_json_is_a_200_and_garbage_is_malformed() {
        let response = http_response(br#"{"hello":"world"}"#).unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(body_of(response).await, br#"{"hello":"world"}"#);

        let response = http_response(br#"{"statusCode":204}"#).unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert!(body_of(response).await.is_empty());

        assert!(http_response(b"not json").is_err());
        assert!(http_response(br#"{"statusCode":"200"}"#).is_err());
        assert!(http_response(br#"{"statusCode":99}"#).is_err());
        assert!(
            http_response(br#"{"statusCode":200,"body":"%%","isBase64Encoded":true}"#).is_err()
        );
        assert!(http_response(br#"{"statusCode":200,"headers":{"bad header":"x"}}"#).is_err());
    }

    #[test]
    fn gateway_errors_carry_a_message() {
        let response = gateway_error(StatusCode::BAD_GATEWAY, "Internal Server Error");
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    }
}
