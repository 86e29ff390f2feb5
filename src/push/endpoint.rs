//! `PUT /v1/e/{token}`: app servers announce a new version.
//!
//! Order matters: parse everything and verify the token's tag, take a token from the
//! registration's rate-limit bucket (so a forged token costs no bucket and a limited PUT no
//! store call), resolve the token, then [`events::raise`] (compare-and-set, group commit, nudge).
//! Both successes wait for the commit: a 202 for the version it raised, a 200 for the newer
//! version it reports.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::config::Config;
use crate::http::{json, read_body, HttpError};
use crate::keys::Keys;
use crate::push::delivery::Delivery;
use crate::push::events::{self, Outcome};
use crate::ratelimit::retry_after_secs;
use crate::state::Guards;
use crate::store::{now_ms, Store, TokenTarget, VersionReq};

/// The handler: counts every answer by status, then returns it.
pub async fn put(
    State(config): State<Arc<Config>>,
    State(keys): State<Arc<Keys>>,
    State(guards): State<Guards>,
    State(delivery): State<Delivery>,
    token: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = match token {
        Ok(Path(token)) => put_version(&config, &keys, &guards, &delivery, &token, &headers, body).await,
        Err(_) => Err(HttpError::UnknownToken),
    };
    let response = match result {
        Ok((status, version)) => json(status, format!("{{\"version\":{version}}}")),
        Err(e) => e.into_response(),
    };
    delivery.metrics.count_put(response.status());
    response
}

async fn put_version(
    config: &Config,
    keys: &Keys,
    guards: &Guards,
    delivery: &Delivery,
    token: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<(StatusCode, u64), HttpError> {
    let limits = &config.limits;
    let body = read_body(headers, body, limits.max_body_bytes).await?;
    let id = keys.open_token(token).ok_or(HttpError::UnknownToken)?;
    let version = parse_version(&body)?;
    let ttl = parse_ttl(headers, limits.default_ttl_secs, limits.max_ttl_secs)?;
    if let Some(buckets) = &guards.put {
        buckets
            .take(id, Instant::now())
            .map_err(|wait| HttpError::RateLimited {
                retry_after_secs: retry_after_secs(wait),
            })?;
    }
    let unavailable = |e| delivery.unavailable(e);
    let (uaid, appid) = match delivery.store.lookup_token(id).await.map_err(unavailable)? {
        TokenTarget::Active(uaid, appid) => (uaid, appid),
        TokenTarget::Gone => return Err(HttpError::Gone),
        TokenTarget::Unknown => return Err(HttpError::UnknownToken),
    };
    let now = now_ms();
    let request = version.map_or(VersionReq::Clock(now), VersionReq::Exact);
    let expires = now.saturating_add(ttl.as_millis() as u64);
    match events::raise(delivery, uaid, appid, request, expires)
        .await
        .map_err(unavailable)?
    {
        Outcome::Raised(raised) => Ok((StatusCode::ACCEPTED, raised.version)),
        Outcome::Superseded(current) => Ok((StatusCode::OK, current)),
        Outcome::Gone => Err(HttpError::Gone),
        Outcome::Exhausted => Err(HttpError::VersionExhausted),
    }
}

/// The version a body names, or `None` for an empty body (the server picks one).
pub fn parse_version(body: &[u8]) -> Result<Option<u64>, HttpError> {
    let body = body.trim_ascii();
    if body.is_empty() {
        return Ok(None);
    }
    // The body's shape decides, not Content-Type: `curl -d '{"version":5}'` sends JSON labelled
    // as a form, and SimplePush app servers send forms under many labels.
    if body.starts_with(b"{") {
        #[derive(Deserialize)]
        struct VersionBody {
            version: Option<serde_json::Number>,
        }
        let parsed: VersionBody = serde_json::from_slice(body)
            .map_err(|_| HttpError::InvalidVersion("body must be a JSON object {\"version\": N}"))?;
        let number = parsed
            .version
            .ok_or(HttpError::InvalidVersion("\"version\" is missing"))?;
        return number
            .as_u64()
            .map(Some)
            .ok_or(HttpError::InvalidVersion("must be an integer from 0 to 2^64-1"));
    }
    let value = body
        .split(|&b| b == b'&')
        .filter_map(|pair| pair.strip_prefix(b"version="))
        .next()
        .ok_or(HttpError::InvalidVersion(
            "body must be version=N or {\"version\": N}",
        ))?;
    parse_decimal(value)
        .map(Some)
        .ok_or(HttpError::InvalidVersion("must be an integer from 0 to 2^64-1"))
}

/// Plain decimal digits to u64; `None` for a sign, other characters, or overflow.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The `TTL` header, clamped to `[1, max]` seconds: 0 still reaches a connected client.
pub fn parse_ttl(headers: &HeaderMap, default: u64, max: u64) -> Result<Duration, HttpError> {
    let secs = match headers.get("ttl") {
        None => default,
        Some(v) => parse_decimal(v.as_bytes().trim_ascii()).ok_or(HttpError::InvalidTtl)?,
    };
    Ok(Duration::from_secs(secs.clamp(1, max.max(1))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_from_form_json_and_empty() {
        assert_eq!(parse_version(b"version=42").unwrap(), Some(42));
        assert_eq!(parse_version(b"version=42&ttl=5").unwrap(), Some(42));
        assert_eq!(
            parse_version(b"version=18446744073709551615").unwrap(),
            Some(u64::MAX)
        );
        assert_eq!(parse_version(b"{\"version\": 7}").unwrap(), Some(7));
        assert_eq!(parse_version(b" {\"version\":0} ").unwrap(), Some(0));
        assert_eq!(parse_version(b"").unwrap(), None);
        assert_eq!(parse_version(b" \n").unwrap(), None);
        for bad in [
            "version=-1",
            "version=abc",
            "version=18446744073709551616",
            "version=",
            "v=1",
            "version=+1",
            "{\"version\":-1}",
            "{\"version\":\"5\"}",
            "{\"version\":1.5}",
            "{\"version\":1e30}",
            "{}",
            "{",
            "[1]",
            "[]",
            "\u{89}PNG",
        ] {
            assert!(parse_version(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
