//! HTTP plumbing shared by the handlers: the one error type, its statuses and JSON bodies, and
//! bounded body reading.
//!
//! Every error answer is `{"status":N,"error":"slug","message":"…"}`; 503 and 429 carry
//! `Retry-After`. Statuses are chosen here and nowhere else.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use std::net::{IpAddr, SocketAddr};

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
    #[error("too many new UAIDs from this address: retry in {retry_after_secs} s")]
    UaidRateLimited { retry_after_secs: u64 },
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
    #[error("the request body did not arrive within {0} s")]
    BodyTimeout(u64),
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
            HttpError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            HttpError::VersionExhausted => StatusCode::CONFLICT,
            HttpError::Credentials { error, .. } => {
                StatusCode::from_u16(error.status()).unwrap_or(StatusCode::BAD_REQUEST)
            }
            HttpError::UaidNotAuthenticated(_) => StatusCode::FORBIDDEN,
            HttpError::RateLimited { .. } | HttpError::UaidRateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
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
            HttpError::UaidRateLimited { .. } => "uaid_rate_limited",
            HttpError::StoreUnavailable { .. } => "store_unavailable",
            HttpError::ShuttingDown => "shutting_down",
            HttpError::NotFound => "not_found",
            HttpError::MethodNotAllowed => "method_not_allowed",
            HttpError::BodyRead => "body_read_failed",
            HttpError::BodyTimeout(_) => "body_timeout",
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
            | HttpError::RateLimited { retry_after_secs }
            | HttpError::UaidRateLimited { retry_after_secs } => Some(retry_after_secs),
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
        if caused_by::<http_body_util::LengthLimitError>(&e) {
            HttpError::BodyTooLarge(limit)
        } else if let Some(t) = find_cause::<crate::accept::BodyTimeout>(&e) {
            HttpError::BodyTimeout(t.0)
        } else {
            HttpError::BodyRead
        }
    })
}

/// Whether `T` is among the causes of `e` (bodies wrap their errors a layer or two deep).
fn caused_by<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    find_cause::<T>(e).is_some()
}

fn find_cause<'a, T: std::error::Error + 'static>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a T> {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(t) = c.downcast_ref::<T>() {
            return Some(t);
        }
        cause = c.source();
    }
    None
}

/// The client's address for per-client limits: the last entry of `trusted_proxy_header` when
/// configured (what the nearest proxy saw; earlier entries are the client's own word), else
/// the peer of the TCP connection.
pub fn client_ip(
    trusted_proxy_header: &str,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
) -> Option<IpAddr> {
    let forwarded = || {
        let value = headers
            .get_all(trusted_proxy_header)
            .iter()
            .next_back()?
            .to_str()
            .ok()?;
        let last = value.rsplit(',').next()?.trim();
        last.parse::<IpAddr>()
            .ok()
            .or_else(|| last.parse::<SocketAddr>().ok().map(|a| a.ip()))
    };
    let from_proxy = if trusted_proxy_header.is_empty() {
        None
    } else {
        forwarded()
    };
    from_proxy.or(peer.map(|p| p.ip()))
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
