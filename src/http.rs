//! HTTP plumbing shared by the handlers: the one error type, its statuses and JSON bodies, and
//! bounded body reading.
//!
//! Every error answer is `{"status":N,"error":"slug","message":"…"}`; 503 and 429 carry
//! `Retry-After`. Statuses are chosen here and nowhere else.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::push::proto::EntryError;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("no endpoint has this token")]
    UnknownToken,
    #[error("this endpoint was unregistered")]
    Gone,
    #[error("request body exceeds the limit of {0} bytes")]
    BodyTooLarge(usize),
    #[error("invalid version: {0}")]
    InvalidVersion(&'static str),
    #[error("invalid TTL header: expected whole seconds from 0 to 2^64-1")]
    InvalidTtl,
    #[error("the server cannot pick a version above the last known one below 2^53")]
    VersionExhausted,
    #[error("invalid request body: {0}")]
    InvalidBody(String),
    #[error("invalid query string: {0}")]
    InvalidQuery(String),
    #[error("a request may name at most {0} UAIDs")]
    TooManyUaids(usize),
    #[error("UAID {uaid:?}: {error}")]
    Credentials { error: EntryError, uaid: String },
    #[error("UAID {0} is not among the authenticated UAIDs of this request")]
    UaidNotAuthenticated(String),
    #[error("too many PUTs to this endpoint: retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("the store cannot take the request now")]
    StoreUnavailable { retry_after_secs: u64 },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("no such resource")]
    NotFound,
    #[error("method not allowed on this resource")]
    MethodNotAllowed,
    #[error("could not read the request body")]
    BodyRead,
    #[error("not a WebSocket handshake: {0}")]
    InvalidUpgrade(String),
}

impl HttpError {
    pub fn status(&self) -> StatusCode {
        match self {
            HttpError::UnknownToken | HttpError::NotFound => StatusCode::NOT_FOUND,
            HttpError::Gone => StatusCode::GONE,
            HttpError::BodyTooLarge(_) | HttpError::TooManyUaids(_) => StatusCode::PAYLOAD_TOO_LARGE,
            HttpError::InvalidVersion(_)
            | HttpError::InvalidTtl
            | HttpError::InvalidBody(_)
            | HttpError::InvalidQuery(_)
            | HttpError::BodyRead
            | HttpError::InvalidUpgrade(_) => StatusCode::BAD_REQUEST,
            HttpError::VersionExhausted => StatusCode::CONFLICT,
            HttpError::Credentials { error, .. } => {
                StatusCode::from_u16(error.status()).unwrap_or(StatusCode::BAD_REQUEST)
            }
            HttpError::UaidNotAuthenticated(_) => StatusCode::FORBIDDEN,
            HttpError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            HttpError::StoreUnavailable { .. } | HttpError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            HttpError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    pub fn slug(&self) -> &'static str {
        match self {
            HttpError::UnknownToken => "unknown_token",
            HttpError::Gone => "gone",
            HttpError::BodyTooLarge(_) => "body_too_large",
            HttpError::InvalidVersion(_) => "invalid_version",
            HttpError::InvalidTtl => "invalid_ttl",
            HttpError::VersionExhausted => "version_exhausted",
            HttpError::InvalidBody(_) => "invalid_body",
            HttpError::InvalidQuery(_) => "invalid_query",
            HttpError::TooManyUaids(_) => "too_many_uaids",
            HttpError::Credentials { error, .. } => error.slug(),
            HttpError::UaidNotAuthenticated(_) => "uaid_not_authenticated",
            HttpError::RateLimited { .. } => "rate_limited",
            HttpError::StoreUnavailable { .. } => "store_unavailable",
            HttpError::ShuttingDown => "shutting_down",
            HttpError::NotFound => "not_found",
            HttpError::MethodNotAllowed => "method_not_allowed",
            HttpError::BodyRead => "body_read_failed",
            HttpError::InvalidUpgrade(_) => "invalid_upgrade",
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::json!({
            "status": status.as_u16(),
            "error": self.slug(),
            "message": self.to_string(),
        });
        let mut response = (status, axum::Json(body)).into_response();
        let retry_after = match self {
            HttpError::StoreUnavailable { retry_after_secs }
            | HttpError::RateLimited { retry_after_secs } => Some(retry_after_secs),
            HttpError::Credentials {
                error: EntryError::UpstreamUnavailable { retry_after_secs },
                ..
            } => Some(retry_after_secs),
            HttpError::ShuttingDown => Some(1),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Reads a body of at most `limit` bytes; a declared or actual larger one is 413.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, HttpError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(HttpError::BodyTooLarge(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large =
            std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            HttpError::BodyTooLarge(limit)
        } else {
            HttpError::BodyRead
        }
    })
}

/// A JSON answer with a status.
pub fn json(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body,
    )
        .into_response()
}
