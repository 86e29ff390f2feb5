//! The storage API's one error type, [`StorageError`], and its answers: statuses, the Sync
//! numeric error bodies and the `X-Weave-*` headers are chosen here and nowhere else.
//!
//! Sync 1.5 error bodies are bare JSON numbers: the spec's error code in a 400 (and 403/413),
//! `0` elsewhere.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::bso::format_ts;

/// Sync's numeric error codes (the ones this server answers with).
pub mod code {
    /// Illegal method or protocol.
    pub const ILLEGAL_METHOD: u8 = 1;
    /// JSON parse failure.
    pub const JSON_PARSE: u8 = 6;
    /// Invalid Weave Basic Object.
    pub const INVALID_WBO: u8 = 8;
    /// Invalid collection name.
    pub const INVALID_COLLECTION: u8 = 13;
    /// User over quota.
    pub const OVER_QUOTA: u8 = 14;
    /// Size limit exceeded.
    pub const SIZE_LIMIT: u8 = 17;
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// 400 with the given Sync error code.
    #[error("invalid request ({code}): {detail}")]
    Invalid { code: u8, detail: String },
    #[error("authentication failed: {0}")]
    Unauthorized(&'static str),
    #[error("over quota")]
    OverQuota,
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("none of the accepted types is served (application/json, application/newlines)")]
    NotAcceptable,
    /// Not an error, but an early answer: 304 with the resource's last-modified time.
    #[error("not modified")]
    NotModified { last_modified: u64 },
    #[error("modified since X-If-Unmodified-Since")]
    PreconditionFailed { last_modified: u64 },
    /// 413, with `X-Weave-Limit: <config key>=<value>` naming the limit passed.
    #[error("request body over {limit} ({max} bytes)")]
    TooLarge { limit: &'static str, max: u64 },
    #[error("unsupported content type")]
    UnsupportedMediaType,
    #[error("overloaded: retry in {retry_after_secs} s")]
    Unavailable { retry_after_secs: u64 },
    /// Refused for load (`shed_in_flight`): answered as `Unavailable`, logged quietly.
    #[error("shed for load: retry in {retry_after_secs} s")]
    Overloaded { retry_after_secs: u64 },
    #[error("this service has reached its end of life")]
    EndOfLife,
    #[error("store: {0}")]
    Store(String),
}

impl StorageError {
    pub fn invalid(code: u8, detail: impl Into<String>) -> StorageError {
        StorageError::Invalid {
            code,
            detail: detail.into(),
        }
    }

    /// 400, "Invalid Weave Basic Object".
    pub fn bad_bso(detail: impl Into<String>) -> StorageError {
        StorageError::invalid(code::INVALID_WBO, detail)
    }

    pub fn status(&self) -> StatusCode {
        match self {
            StorageError::Invalid { .. } => StatusCode::BAD_REQUEST,
            StorageError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            StorageError::OverQuota => StatusCode::FORBIDDEN,
            StorageError::NotFound => StatusCode::NOT_FOUND,
            StorageError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            StorageError::NotAcceptable => StatusCode::NOT_ACCEPTABLE,
            StorageError::NotModified { .. } => StatusCode::NOT_MODIFIED,
            StorageError::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
            StorageError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            StorageError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            StorageError::Unavailable { .. } | StorageError::Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            StorageError::EndOfLife => StatusCode::from_u16(513).unwrap_or(StatusCode::GONE),
            StorageError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The Sync error code sent as the body.
    pub fn weave_code(&self) -> u8 {
        match self {
            StorageError::Invalid { code, .. } => *code,
            StorageError::OverQuota => code::OVER_QUOTA,
            StorageError::TooLarge { .. } => code::SIZE_LIMIT,
            _ => 0,
        }
    }
}

impl IntoResponse for StorageError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error()
            && !matches!(self, StorageError::EndOfLife | StorageError::Overloaded { .. })
        {
            tracing::warn!(error = %self, "storage request failed");
        } else {
            tracing::debug!(error = %self, "storage request refused");
        }
        if let StorageError::NotModified { last_modified } = self {
            let mut response = status.into_response();
            set_ts(&mut response, "x-last-modified", last_modified);
            return response;
        }
        let mut response = (
            status,
            [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            self.weave_code().to_string(),
        )
            .into_response();
        match self {
            StorageError::PreconditionFailed { last_modified } => {
                set_ts(&mut response, "x-last-modified", last_modified);
            }
            StorageError::Unavailable { retry_after_secs }
            | StorageError::Overloaded { retry_after_secs } => {
                let headers = response.headers_mut();
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
                headers.insert("x-weave-backoff", HeaderValue::from(retry_after_secs));
            }
            StorageError::TooLarge { limit, max } => {
                if let Ok(v) = HeaderValue::from_str(&format!("{limit}={max}")) {
                    response.headers_mut().insert("x-weave-limit", v);
                }
            }
            StorageError::Unauthorized(_) => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Hawk"));
            }
            _ => {}
        }
        response
    }
}

/// Sets a timestamp header (`X-Last-Modified`, `X-Weave-Timestamp`) in Sync's format.
pub fn set_ts(response: &mut Response, name: &'static str, ms: u64) {
    if let Ok(value) = HeaderValue::from_str(&format_ts(ms)) {
        response.headers_mut().insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_the_sync_codes() {
        assert_eq!(StorageError::bad_bso("x").weave_code(), 8);
        let too_large = StorageError::TooLarge {
            limit: "max_request_bytes",
            max: 10,
        };
        assert_eq!(too_large.weave_code(), 17);
        assert_eq!(StorageError::OverQuota.weave_code(), 14);
        assert_eq!(StorageError::NotFound.weave_code(), 0);
        assert_eq!(StorageError::EndOfLife.status().as_u16(), 513);
    }
}
