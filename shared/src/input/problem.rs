//! Errors as RFC 9457 `application/problem+json`, mapped to HTTP in this one place.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::app::AppError;
use crate::ports::StoreError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// A stable identifier clients can match on.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    /// The request field at fault, in the request's own spelling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl Problem {
    pub fn malformed(detail: impl Into<String>) -> Self {
        Self {
            kind: "urn:tidings:problem:malformed-json",
            title: "Malformed JSON",
            status: 400,
            detail: detail.into(),
            field: None,
        }
    }

    pub fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Self {
        let field = field.into();
        Self {
            kind: "urn:tidings:problem:invalid-field",
            title: "Invalid field",
            status: 422,
            detail: format!("`{field}`: {}", detail.into()),
            field: Some(field),
        }
    }

    /// This problem as part of `prefix` (an item of a batch): its field becomes `prefix.field`
    /// (or `prefix`); a malformed item is an invalid field of the request. Type and status stay.
    pub fn within(mut self, prefix: &str) -> Self {
        if self.status == 400 {
            return Self::invalid(prefix, self.detail);
        }
        match self.field.take() {
            Some(old) => {
                let field = format!("{prefix}.{old}");
                let message = self
                    .detail
                    .strip_prefix(&format!("`{old}`: "))
                    .unwrap_or(&self.detail)
                    .to_owned();
                self.detail = format!("`{field}`: {message}");
                self.field = Some(field);
            }
            None => self.field = Some(prefix.to_owned()),
        }
        self
    }

    pub fn unauthorized() -> Self {
        Self {
            kind: "urn:tidings:problem:unauthorized",
            title: "Unauthorized",
            status: 401,
            detail: "send `Authorization: Bearer <api key>` with a valid key".into(),
            field: None,
        }
    }

    pub fn not_found(what: &str) -> Self {
        Self {
            kind: "urn:tidings:problem:not-found",
            title: "Not found",
            status: 404,
            detail: format!("no such {what}"),
            field: None,
        }
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self {
            kind: "urn:tidings:problem:conflict",
            title: "Conflict",
            status: 409,
            detail: detail.into(),
            field: None,
        }
    }

    pub fn too_large(limit: usize) -> Self {
        Self {
            kind: "urn:tidings:problem:body-too-large",
            title: "Request body too large",
            status: 413,
            detail: format!("request bodies are limited to {limit} bytes"),
            field: None,
        }
    }

    pub fn unavailable() -> Self {
        Self {
            kind: "urn:tidings:problem:unavailable",
            title: "Service unavailable",
            status: 503,
            detail: "the store is unavailable; retry with the same Idempotency-Key".into(),
            field: None,
        }
    }
}

impl From<AppError> for Problem {
    fn from(e: AppError) -> Self {
        match e {
            AppError::NotFound(what) => Self::not_found(what),
            AppError::Invalid { field, message } => Self::invalid(field, message),
            AppError::Conflict(detail) => Self::conflict(detail),
            AppError::IdempotencyMismatch(detail) => Self {
                kind: "urn:tidings:problem:idempotency-key-reused",
                title: "Idempotency key reused with another body",
                status: 422,
                detail,
                field: None,
            },
            AppError::Store(StoreError::BadCursor) => {
                Self::invalid("cursor", "is not a cursor this list handed out")
            }
            AppError::Store(StoreError::NotFound) => Self::not_found("resource"),
            AppError::Store(StoreError::Conflict) => {
                Self::conflict("the resource changed meanwhile; retry")
            }
            AppError::Store(StoreError::Unavailable(source)) => {
                tracing::error!(error = %source, "store unavailable");
                Self::unavailable()
            }
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let unauthorized = status == StatusCode::UNAUTHORIZED;
        let mut response = (status, axum::Json(self)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if unauthorized {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        Problem::from(self).into_response()
    }
}
