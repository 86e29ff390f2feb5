//! What editiond serves to browsers besides the protocol: the client module web apps import
//! (`GET /edition.js`), a demo page built on it (`GET /demo`, with `/` redirecting there), and
//! the CORS policy of the HTTP calls a page may make. `proto/browser.md` documents all of it.
//!
//! The files live in `web/` and are embedded at build time, so the binary serves them with
//! nothing installed and nothing to build. Each is answered with a strong `ETag` and
//! `Cache-Control: no-cache`: browsers revalidate (a 304 costs a few bytes) and never run a
//! client older than the server they talk to.

use std::sync::OnceLock;

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::config::WebConfig;

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";

/// One embedded file and the headers it is served with.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    /// `*` for the client, which pages on any origin import as a module (module scripts are
    /// fetched in CORS mode, so without it a cross-origin import fails).
    cors: bool,
    /// A hash of `body`, made on first use.
    etag: OnceLock<HeaderValue>,
}

static CLIENT: Asset = Asset {
    body: include_str!("../../web/edition.js"),
    content_type: JS,
    cors: true,
    etag: OnceLock::new(),
};
static DEMO_HTML: Asset = Asset {
    body: include_str!("../../web/demo.html"),
    content_type: HTML,
    cors: false,
    etag: OnceLock::new(),
};
static DEMO_CSS: Asset = Asset {
    body: include_str!("../../web/demo.css"),
    content_type: CSS,
    cors: false,
    etag: OnceLock::new(),
};
static DEMO_JS: Asset = Asset {
    body: include_str!("../../web/demo.js"),
    content_type: JS,
    cors: false,
    etag: OnceLock::new(),
};

/// The demo loads only its own files and talks only to this server (over HTTP and WebSocket).
const DEMO_CSP: &str = "default-src 'self'; connect-src 'self' ws: wss:; base-uri 'none'; \
                        form-action 'none'; frame-ancestors 'none'";

/// The routes `[web]` switches on, for the server's router to merge. With both off, none.
pub fn routes<S: Clone + Send + Sync + 'static>(config: &WebConfig) -> Router<S> {
    let mut router = Router::new();
    if config.client {
        router = router.route(
            "/edition.js",
            get(|h: HeaderMap| async move { serve(&CLIENT, &h) }),
        );
    }
    if config.demo {
        router = router
            .route("/", get(|| async { Redirect::temporary("/demo") }))
            .route("/demo", get(|h: HeaderMap| async move { serve(&DEMO_HTML, &h) }))
            .route(
                "/demo.css",
                get(|h: HeaderMap| async move { serve(&DEMO_CSS, &h) }),
            )
            .route("/demo.js", get(|h: HeaderMap| async move { serve(&DEMO_JS, &h) }));
    }
    router
}

/// Answers `asset`, or 304 when the browser already has this version of it.
fn serve(asset: &'static Asset, request: &HeaderMap) -> Response {
    let etag = etag(asset);
    let fresh = request.get(header::IF_NONE_MATCH).is_some_and(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii() == etag.as_bytes())
    });
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type))],
            asset.body,
        )
            .into_response()
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if asset.cors {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        // Lets pages that isolate themselves (COEP `require-corp`) import it too.
        headers.insert(
            HeaderName::from_static("cross-origin-resource-policy"),
            HeaderValue::from_static("cross-origin"),
        );
    }
    if asset.content_type == HTML {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(DEMO_CSP),
        );
        headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    }
    response
}

/// A strong validator for `asset`: the start of a SHA-256 of its bytes, in base64url.
fn etag(asset: &Asset) -> HeaderValue {
    asset
        .etag
        .get_or_init(|| {
            let digest = Sha256::digest(asset.body.as_bytes());
            let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..12]);
            // base64url characters and quotes are all valid in a header value.
            HeaderValue::from_str(&format!("\"{tag}\"")).unwrap_or(HeaderValue::from_static("\"\""))
        })
        .clone()
}

/// The HTTP calls a browser client may make to this server from any origin.
///
/// CORS policy: any origin, no credentials. These calls carry their credentials (a UAID's
/// secret) in the body and never rely on cookies or other ambient authority, so a page can only
/// do what its own secrets allow, and `Access-Control-Allow-Origin: *` (which browsers never
/// combine with cookies) grants nothing more. Endpoint PUTs are for app servers and the
/// WebSocket is outside CORS, so neither is listed.
const CORS_PATHS: [&str; 4] = ["/v1/poll", "/v1/ack", "/v1/register", "/v1/unregister"];

/// How long a browser may cache a preflight answer, in seconds.
const PREFLIGHT_MAX_AGE_SECS: u32 = 86_400;

/// Middleware applying the CORS policy of [`CORS_PATHS`]: answers their `OPTIONS` preflight
/// (204) itself and adds `Access-Control-Allow-Origin: *` to every answer of theirs, errors
/// included, exposing `Retry-After` so a page can honour it.
pub async fn cors(request: Request, next: Next) -> Response {
    if !CORS_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let mut response = if request.method() == Method::OPTIONS {
        let mut preflight = StatusCode::NO_CONTENT.into_response();
        let headers = preflight.headers_mut();
        headers.insert(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"));
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("POST"),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("content-type"),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from(PREFLIGHT_MAX_AGE_SECS),
        );
        preflight
    } else {
        let mut answer = next.run(request).await;
        answer.headers_mut().insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("retry-after"),
        );
        answer
    };
    response
        .headers_mut()
        .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    response
}
