//! HTTP for the storage API: routes, request parsing, the Sync 1.5 semantics of each endpoint,
//! and the headers every answer carries (`X-Weave-Timestamp`, CORS, end-of-life alerts).
//!
//! Writes run under the user's write lock: the timestamp is chosen (strictly above the user's
//! last one), preconditions are checked, the changes are applied atomically and committed
//! durably, and only then is the lock released and the client answered. Reads take the read
//! lock, so they see whole, durable writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use serde_json::Value;

use super::bso::{self, format_ts, now_ms, parse_ts, BsoIn, RecordLimits};
use super::error::{code, set_ts, StorageError};
use super::load::Level;
use super::store::{BatchMeta, BsoMeta, Change, StorageStore, StoredBso, NO_EXPIRY};
use super::Storage;

type Result<T, E = StorageError> = std::result::Result<T, E>;

/// The routes: heartbeats at the root, the API nested under `/1.5` (its unmatched paths answer
/// Sync's 404 `0`). Nested handlers see the path without `/1.5`; [`PREFIX`] restores it for Hawk.
pub fn router<S: Clone + Send + Sync + 'static>(storage: Arc<Storage>) -> Router<S> {
    let api = Router::new()
        .route("/{uid}", delete(delete_user).fallback(not_allowed))
        .route("/{uid}/info/{what}", get(info).fallback(not_allowed))
        .route("/{uid}/storage", delete(delete_storage).fallback(not_allowed))
        .route(
            "/{uid}/storage/{collection}",
            get(get_collection)
                .post(post_collection)
                .delete(delete_collection)
                .fallback(not_allowed),
        )
        .route(
            "/{uid}/storage/{collection}/{id}",
            get(get_item)
                .put(put_item)
                .delete(delete_item)
                .fallback(not_allowed),
        )
        .fallback(|| async { StorageError::NotFound });
    Router::new()
        .route("/__heartbeat__", get(heartbeat))
        .route(
            "/__lbheartbeat__",
            get(|| async { json(StatusCode::OK, "{}".into()) }),
        )
        .nest(PREFIX, api)
        .layer(middleware::from_fn_with_state(storage.clone(), finish))
        .with_state(storage)
}

/// Where the API is mounted.
pub const PREFIX: &str = "/1.5";

async fn not_allowed() -> StorageError {
    StorageError::MethodNotAllowed
}

fn json(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body,
    )
        .into_response()
}

/// Headers of every storage answer: CORS preflights are answered here (before
/// authentication), a hard end of life answers 513, load is measured (and sheds or adds
/// `X-Weave-Backoff`, see [`super::load`]), and every answer gets
/// `X-Weave-Timestamp` (unless the handler set it: a write's own timestamp) and CORS and alert
/// headers.
async fn finish(State(storage): State<Arc<Storage>>, request: Request, next: Next) -> Response {
    let origin = request.headers().get(header::ORIGIN).cloned();
    let config = &storage.config;
    let mut response = if request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        let mut r = StatusCode::OK.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("DELETE, GET, POST, PUT"),
        );
        let asked = request
            .headers()
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            asked.unwrap_or(HeaderValue::from_static("authorization, content-type")),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from(config.cors_max_age_secs),
        );
        r
    } else if config.eol == "hard" && !request.uri().path().starts_with("/__") {
        StorageError::EndOfLife.into_response()
    } else if request.uri().path().starts_with("/__") {
        // Heartbeats are neither counted as load nor refused for it.
        next.run(request).await
    } else {
        let entered = storage.load.enter();
        match entered.level {
            Level::Overloaded => StorageError::Overloaded {
                retry_after_secs: config.backoff_secs,
            }
            .into_response(),
            level => {
                let mut response = next.run(request).await;
                if level == Level::Busy && !response.headers().contains_key("x-weave-backoff") {
                    response
                        .headers_mut()
                        .insert("x-weave-backoff", HeaderValue::from(config.backoff_secs));
                }
                response
            }
        }
    };
    storage.count(response.status());
    if !response.headers().contains_key("x-weave-timestamp") {
        set_ts(&mut response, "x-weave-timestamp", now_ms());
    }
    if !config.eol.is_empty() {
        let alert = serde_json::json!({
            "code": format!("{}-eol", config.eol),
            "message": config.eol_message,
            "url": config.eol_url,
        });
        if let Ok(v) = HeaderValue::from_str(&alert.to_string()) {
            response.headers_mut().insert("x-weave-alert", v);
        }
    }
    if let Some(origin) = origin {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(
                "x-weave-timestamp, x-last-modified, x-weave-records, x-weave-next-offset, \
                 x-weave-quota-remaining, x-weave-backoff, x-weave-alert, retry-after",
            ),
        );
    }
    response
}

async fn heartbeat(State(storage): State<Arc<Storage>>) -> Response {
    match storage.store().user_modified(0) {
        Ok(_) => json(StatusCode::OK, r#"{"status":"Ok","database":"Ok"}"#.into()),
        Err(e) => {
            tracing::warn!(error = %e, "storage heartbeat: the store does not answer");
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"status":"Err","database":"Err"}"#.into(),
            )
        }
    }
}

/// An authenticated request: its head, body and user.
struct Authed {
    parts: Parts,
    body: Bytes,
    uid: u64,
}

async fn authed(storage: &Storage, uid: &str, request: Request, allow_expired: bool) -> Result<Authed> {
    let uid: u64 = uid.parse().map_err(|_| StorageError::NotFound)?;
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, storage.config.max_request_bytes)
        .await
        .map_err(|_| StorageError::TooLarge {
            limit: "max_request_bytes",
            max: storage.config.max_request_bytes as u64,
        })?;
    let uid = storage.authenticate(&parts, &body, uid, allow_expired)?;
    Ok(Authed { parts, body, uid })
}

pub fn query(parts: &Parts) -> Result<HashMap<String, String>> {
    let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
        .map_err(|_| StorageError::invalid(code::INVALID_WBO, "malformed query string"))?;
    Ok(pairs.into_iter().collect())
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// X-If-Modified-Since and X-If-Unmodified-Since, validated.
#[derive(Default, Clone, Copy)]
struct Preconditions {
    modified_since: Option<u64>,
    unmodified_since: Option<u64>,
}

impl Preconditions {
    fn parse(headers: &HeaderMap) -> Result<Preconditions> {
        let read = |name: &str| -> Result<Option<u64>> {
            match headers.get(name) {
                None => Ok(None),
                Some(v) => v
                    .to_str()
                    .ok()
                    .and_then(parse_ts)
                    .map(Some)
                    .ok_or_else(|| StorageError::invalid(code::INVALID_WBO, format!("invalid {name}"))),
            }
        };
        let p = Preconditions {
            modified_since: read("x-if-modified-since")?,
            unmodified_since: read("x-if-unmodified-since")?,
        };
        if p.modified_since.is_some() && p.unmodified_since.is_some() {
            return Err(StorageError::invalid(
                code::INVALID_WBO,
                "X-If-Modified-Since and X-If-Unmodified-Since together",
            ));
        }
        Ok(p)
    }

    /// For reads: 304 when not modified since, 412 when modified since.
    fn check_read(&self, last_modified: u64) -> Result<()> {
        if self.modified_since.is_some_and(|t| last_modified <= t) {
            return Err(StorageError::NotModified { last_modified });
        }
        self.check_write(last_modified)
    }

    /// For writes: 412 when the resource changed after X-If-Unmodified-Since.
    fn check_write(&self, last_modified: u64) -> Result<()> {
        if self.unmodified_since.is_some_and(|t| last_modified > t) {
            return Err(StorageError::PreconditionFailed { last_modified });
        }
        Ok(())
    }
}

fn store_err(e: super::store::StorageStoreError) -> StorageError {
    StorageError::Store(e.to_string())
}

fn check_collection(name: &str) -> Result<()> {
    if bso::valid_collection(name) {
        Ok(())
    } else {
        Err(StorageError::invalid(
            code::INVALID_COLLECTION,
            "invalid collection name",
        ))
    }
}

/// What a write closure decided.
struct Outcome<T> {
    changes: Vec<Change>,
    /// Whether this is a change of data (the user's timestamp moves and observers hear of it),
    /// as opposed to batch bookkeeping.
    data: bool,
    value: T,
}

impl Storage {
    /// Runs `f` under the user's write lock with the write's timestamp and applies what it
    /// returns; then, with the lock released (so the user's next write can share the commit),
    /// waits until it is durable and tells the observer. 503 when the lock or the commit takes
    /// longer than `write_timeout_ms`.
    async fn write<T>(
        &self,
        uid: u64,
        f: impl FnOnce(&dyn StorageStore, u64) -> Result<Outcome<T>>,
    ) -> Result<(T, u64)> {
        let deadline = tokio::time::Instant::now() + self.write_timeout();
        let stripe = self.stripe(uid);
        let guard = tokio::time::timeout_at(deadline, self.locks[stripe].write())
            .await
            .map_err(|_| self.unavailable())?;
        let store = self.store();
        let last = store.user_modified(uid).map_err(store_err)?.unwrap_or(0);
        let ts = now_ms().max(last + 10);
        let mut outcome = match f(store, ts) {
            Ok(outcome) => outcome,
            Err(e) => {
                // A refusal (412, 404) also tells what was read.
                drop(guard);
                self.settle(stripe).await?;
                return Err(e);
            }
        };
        if outcome.changes.is_empty() {
            drop(guard);
            self.settle(stripe).await?;
            return Ok((outcome.value, ts));
        }
        if outcome.data {
            outcome.changes.push(Change::SetUserModified(ts));
        }
        // A wipe names no collection: the observer hears of every one it removed or moved,
        // found by comparing the user's collections around it.
        let wipe = outcome.data
            && self.observer.get().is_some()
            && outcome
                .changes
                .iter()
                .any(|c| matches!(c, Change::DeleteAll | Change::DeleteAllExcept { .. }));
        let before = if wipe {
            Some(store.collections(uid).map_err(store_err)?)
        } else {
            None
        };
        store.apply(uid, &outcome.changes).map_err(store_err)?;
        self.dirty[stripe].fetch_add(1, Ordering::SeqCst);
        let wiped = before.map(|before| changed_collections(store, uid, before, ts));
        drop(guard);
        // The commit runs to its end even if this request gives up waiting, and only then
        // stops counting as dirty.
        // The collections whose time moved, for the observer: told once the write is durable,
        // also when this request gave up waiting for it.
        let observed: Vec<(String, u64)> = match (self.observer.get().filter(|_| outcome.data), wiped) {
            (None, _) => Vec::new(),
            (Some(_), Some(wiped)) => wiped,
            (Some(_), None) => outcome
                .changes
                .iter()
                .filter_map(|change| match change {
                    Change::SetCollectionModified { collection, modified } => {
                        Some((collection.clone(), *modified))
                    }
                    // A deleted collection has no time of its own: the write's.
                    Change::DeleteCollection { collection } => Some((collection.clone(), ts)),
                    _ => None,
                })
                .collect(),
        };
        let observer = self.observer.get().cloned();
        let (store, dirty) = (self.store.clone(), self.dirty.clone());
        let waited = self.commit_seconds.clone();
        let committed = tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = store.commit().await;
            waited.observe(started.elapsed().as_secs_f64());
            dirty[stripe].fetch_sub(1, Ordering::SeqCst);
            if let (Ok(()), Some(observer)) = (&result, observer) {
                for (collection, modified) in &observed {
                    observer(uid, collection, *modified);
                }
            }
            result
        });
        match tokio::time::timeout_at(deadline, committed).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(store_err(e)),
            Ok(Err(e)) => return Err(StorageError::Store(format!("commit task: {e}"))),
            Err(_) => return Err(self.unavailable()),
        }
        Ok((outcome.value, ts))
    }

    /// Waits for a commit if the stripe has writes applied but not yet durable: what the
    /// caller read may come from one of them.
    async fn settle(&self, stripe: usize) -> Result<()> {
        if self.dirty[stripe].load(Ordering::SeqCst) == 0 {
            return Ok(());
        }
        match tokio::time::timeout(self.write_timeout(), self.store().commit()).await {
            Ok(result) => result.map_err(store_err),
            Err(_) => Err(self.unavailable()),
        }
    }

    /// Runs `f` under the user's read lock; answers only with durable state (see `settle`).
    async fn read<T>(&self, uid: u64, f: impl FnOnce(&dyn StorageStore) -> Result<T>) -> Result<T> {
        let stripe = self.stripe(uid);
        let guard = tokio::time::timeout(self.write_timeout(), self.locks[stripe].read())
            .await
            .map_err(|_| self.unavailable())?;
        let result = f(self.store());
        drop(guard);
        self.settle(stripe).await?;
        result
    }

    fn record_limits(&self) -> RecordLimits {
        RecordLimits {
            max_payload_bytes: self.config.max_record_payload_bytes,
            max_ttl_secs: self.config.max_ttl_secs,
        }
    }

    /// Payload bytes the user stores (records not yet expired), per collection.
    fn usage(store: &dyn StorageStore, uid: u64, now: u64) -> Result<Vec<(String, u64, u64)>> {
        let mut out = Vec::new();
        for (name, _) in store.collections(uid).map_err(store_err)? {
            let (mut count, mut bytes) = (0u64, 0u64);
            for (_, b) in store.scan_meta(uid, &name).map_err(store_err)? {
                if b.expiry > now {
                    count += 1;
                    bytes += b.payload_len;
                }
            }
            out.push((name, count, bytes));
        }
        Ok(out)
    }

    /// 403 (over quota) if storing `incoming` more payload bytes would pass the quota.
    fn check_quota(&self, store: &dyn StorageStore, uid: u64, incoming: u64) -> Result<()> {
        let quota = self.config.quota_bytes;
        if quota == 0 {
            return Ok(());
        }
        let used: u64 = Self::usage(store, uid, now_ms())?.iter().map(|u| u.2).sum();
        if used + incoming > quota {
            return Err(StorageError::OverQuota);
        }
        Ok(())
    }

    fn quota_remaining(&self, uid: u64) -> Option<HeaderValue> {
        let quota = self.config.quota_bytes;
        if quota == 0 {
            return None;
        }
        let used: u64 = Self::usage(self.store(), uid, now_ms())
            .ok()?
            .iter()
            .map(|u| u.2)
            .sum();
        HeaderValue::from_str(&format!("{:.2}", quota.saturating_sub(used) as f64 / 1024.0)).ok()
    }
}

/// The collections of `before` (the user's, before a write at `ts`) that the write removed
/// (with `ts`) or moved (with their new time). A store that cannot be read now counts every
/// one as removed: an extra event is harmless, a missed one is not.
fn changed_collections(
    store: &dyn StorageStore,
    uid: u64,
    before: Vec<(String, u64)>,
    ts: u64,
) -> Vec<(String, u64)> {
    let after: HashMap<String, u64> = match store.collections(uid) {
        Ok(after) => after.into_iter().collect(),
        Err(e) => {
            tracing::warn!(error = %e, "storage: collections after a wipe not read");
            HashMap::new()
        }
    };
    before
        .into_iter()
        .filter_map(|(name, was)| match after.get(&name) {
            None => Some((name, ts)),
            Some(&now) if now != was => Some((name, now)),
            Some(_) => None,
        })
        .collect()
}

/// A write's answer: body, X-Last-Modified and X-Weave-Timestamp both the write's time.
fn written(storage: &Storage, uid: u64, status: StatusCode, body: String, ts: u64) -> Response {
    let mut r = json(status, body);
    set_ts(&mut r, "x-last-modified", ts);
    set_ts(&mut r, "x-weave-timestamp", ts);
    if let Some(v) = storage.quota_remaining(uid) {
        r.headers_mut().insert("x-weave-quota-remaining", v);
    }
    r
}

fn read_answer(body: String, last_modified: u64) -> Response {
    let mut r = json(StatusCode::OK, body);
    set_ts(&mut r, "x-last-modified", last_modified);
    r
}

// ---- info ----

async fn info(
    State(storage): State<Arc<Storage>>,
    Path((uid, what)): Path<(String, String)>,
    request: Request,
) -> Result<Response> {
    let allow_expired = what == "collections";
    let req = authed(&storage, &uid, request, allow_expired).await?;
    let pre = Preconditions::parse(&req.parts.headers)?;
    let uid = req.uid;
    let config = &storage.config;
    storage
        .read(uid, |store| {
            let last = store.user_modified(uid).map_err(store_err)?.unwrap_or(0);
            let body = match what.as_str() {
                "configuration" => serde_json::json!({
                    "max_request_bytes": config.max_request_bytes,
                    "max_post_records": config.max_post_records,
                    "max_post_bytes": config.max_post_bytes,
                    "max_total_records": config.max_total_records,
                    "max_total_bytes": config.max_total_bytes,
                    "max_record_payload_bytes": config.max_record_payload_bytes,
                })
                .to_string(),
                "collections" => {
                    pre.check_read(last)?;
                    let fields: Vec<String> = store
                        .collections(uid)
                        .map_err(store_err)?
                        .into_iter()
                        .map(|(name, ts)| format!("{}:{}", Value::String(name), format_ts(ts)))
                        .collect();
                    format!("{{{}}}", fields.join(","))
                }
                "quota" => {
                    pre.check_read(last)?;
                    let used: u64 = Storage::usage(store, uid, now_ms())?.iter().map(|u| u.2).sum();
                    let quota = (config.quota_bytes > 0).then(|| config.quota_bytes as f64 / 1024.0);
                    serde_json::json!([used as f64 / 1024.0, quota]).to_string()
                }
                "collection_usage" => {
                    pre.check_read(last)?;
                    let map: serde_json::Map<String, Value> = Storage::usage(store, uid, now_ms())?
                        .into_iter()
                        .map(|(name, _, bytes)| (name, Value::from(bytes as f64 / 1024.0)))
                        .collect();
                    Value::Object(map).to_string()
                }
                "collection_counts" => {
                    pre.check_read(last)?;
                    let map: serde_json::Map<String, Value> = Storage::usage(store, uid, now_ms())?
                        .into_iter()
                        .filter(|u| u.1 > 0)
                        .map(|(name, count, _)| (name, Value::from(count)))
                        .collect();
                    Value::Object(map).to_string()
                }
                _ => return Err(StorageError::NotFound),
            };
            Ok(read_answer(body, last))
        })
        .await
}

// ---- reads of records ----

/// `?sort=`: the order of a listing. Every order ends with the id, so it is total.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Sort {
    /// By id (no `sort` given).
    Id,
    Newest,
    Oldest,
    Index,
}

impl Sort {
    fn parse(text: Option<&str>) -> Result<Sort> {
        match text {
            None | Some("") => Ok(Sort::Id),
            Some("newest") => Ok(Sort::Newest),
            Some("oldest") => Ok(Sort::Oldest),
            Some("index") => Ok(Sort::Index),
            Some(_) => Err(StorageError::invalid(code::INVALID_WBO, "invalid sort")),
        }
    }

    /// The record's position: compare (key, id) ascending.
    fn key(self, b: &BsoMeta) -> i64 {
        match self {
            Sort::Id => 0,
            Sort::Newest => -(b.modified as i64),
            Sort::Oldest => b.modified as i64,
            Sort::Index => -i64::from(b.sortindex.unwrap_or(0)),
        }
    }
}

/// A paging token: the listing's upper time bound (the collection as of the first page) and
/// the last position returned. Text: `bound.key.base64url(id)`.
#[derive(Debug, PartialEq)]
pub struct Offset {
    pub bound: u64,
    pub key: i64,
    pub id: String,
}

impl Offset {
    pub fn encode(&self) -> String {
        format!("{}.{}.{}", self.bound, self.key, URL_SAFE_NO_PAD.encode(&self.id))
    }

    pub fn decode(text: &str) -> Option<Offset> {
        let mut parts = text.splitn(3, '.');
        let bound = parts.next()?.parse().ok()?;
        let key = parts.next()?.parse().ok()?;
        let id = String::from_utf8(URL_SAFE_NO_PAD.decode(parts.next()?).ok()?).ok()?;
        Some(Offset { bound, key, id })
    }
}

/// Serialises one record: `id`, `modified` (two decimals), `payload`, and `sortindex` if set.
fn bso_json(id: &str, b: &BsoMeta, payload: &str) -> String {
    let mut s = format!(
        "{{\"id\":{},\"modified\":{},\"payload\":{}",
        Value::String(id.to_owned()),
        format_ts(b.modified),
        Value::String(payload.to_owned())
    );
    if let Some(i) = b.sortindex {
        s.push_str(&format!(",\"sortindex\":{i}"));
    }
    s.push('}');
    s
}

#[derive(Clone, Copy, PartialEq)]
pub enum Format {
    Json,
    Newlines,
}

pub fn accept(headers: &HeaderMap) -> Result<Format> {
    let Some(accept) = header_str(headers, "accept") else {
        return Ok(Format::Json);
    };
    for item in accept.split(',') {
        let media = item.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match media.as_str() {
            "application/json" | "application/*" | "*/*" | "" => return Ok(Format::Json),
            "application/newlines" => return Ok(Format::Newlines),
            _ => {}
        }
    }
    Err(StorageError::NotAcceptable)
}

pub fn ids_param(storage: &Storage, q: &HashMap<String, String>) -> Result<Option<Vec<String>>> {
    let Some(text) = q.get("ids") else {
        return Ok(None);
    };
    let ids: Vec<String> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if ids.len() > storage.config.max_ids {
        return Err(StorageError::invalid(code::SIZE_LIMIT, "too many ids"));
    }
    Ok(Some(ids))
}

pub fn ts_param(q: &HashMap<String, String>, name: &str) -> Result<Option<u64>> {
    q.get(name)
        .map(|v| {
            parse_ts(v).ok_or_else(|| StorageError::invalid(code::INVALID_WBO, format!("invalid {name}")))
        })
        .transpose()
}

async fn get_collection(
    State(storage): State<Arc<Storage>>,
    Path((uid, collection)): Path<(String, String)>,
    request: Request,
) -> Result<Response> {
    let req = authed(&storage, &uid, request, false).await?;
    check_collection(&collection)?;
    let format = accept(&req.parts.headers)?;
    let pre = Preconditions::parse(&req.parts.headers)?;
    let q = query(&req.parts)?;
    let ids = ids_param(&storage, &q)?;
    let newer = ts_param(&q, "newer")?;
    let older = ts_param(&q, "older")?;
    let limit = match q.get("limit") {
        None => None,
        Some(v) => match v.trim().parse::<u64>() {
            Ok(0) => None,
            Ok(n) => Some(n as usize),
            Err(_) => return Err(StorageError::invalid(code::INVALID_WBO, "invalid limit")),
        },
    };
    let offset = match q.get("offset").filter(|o| !o.is_empty()) {
        None => None,
        Some(o) => Some(
            Offset::decode(o).ok_or_else(|| StorageError::invalid(code::INVALID_WBO, "invalid offset"))?,
        ),
    };
    let full = q.contains_key("full");
    let sort = Sort::parse(q.get("sort").map(String::as_str))?;
    let uid = req.uid;
    storage
        .read(uid, |store| {
            let last = store
                .collection_modified(uid, &collection)
                .map_err(store_err)?
                .unwrap_or(0);
            pre.check_read(last)?;
            let now = now_ms();
            let bound = offset.as_ref().map_or(last, |o| o.bound);
            // Payloads are read with the scan only when every record goes out whole; a page
            // of a listing reads its own payloads after sorting.
            let whole = full && limit.is_none();
            let candidates: Vec<(String, BsoMeta, Option<String>)> = match &ids {
                Some(ids) => {
                    let mut found = Vec::new();
                    for id in ids {
                        if let Some(b) = store.get(uid, &collection, id).map_err(store_err)? {
                            found.push((id.clone(), b.meta(), Some(b.payload)));
                        }
                    }
                    found.sort_by(|a, b| a.0.cmp(&b.0));
                    found.dedup_by(|a, b| a.0 == b.0);
                    found
                }
                None if whole => store
                    .scan(uid, &collection)
                    .map_err(store_err)?
                    .into_iter()
                    .map(|(id, b)| (id, b.meta(), Some(b.payload)))
                    .collect(),
                None => store
                    .scan_meta(uid, &collection)
                    .map_err(store_err)?
                    .into_iter()
                    .map(|(id, m)| (id, m, None))
                    .collect(),
            };
            let mut rows: Vec<(i64, String, BsoMeta, Option<String>)> = candidates
                .into_iter()
                .filter(|(_, b, _)| {
                    b.expiry > now
                        && b.modified <= bound
                        && newer.is_none_or(|t| b.modified > t)
                        && older.is_none_or(|t| b.modified < t)
                })
                .map(|(id, b, payload)| (sort.key(&b), id, b, payload))
                .filter(|(key, id, _, _)| {
                    offset
                        .as_ref()
                        .is_none_or(|o| (*key, id.as_str()) > (o.key, o.id.as_str()))
                })
                .collect();
            rows.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
            let more = limit.is_some_and(|l| rows.len() > l);
            if let Some(l) = limit {
                rows.truncate(l);
            }
            let mut items: Vec<String> = Vec::with_capacity(rows.len());
            for (_, id, meta, payload) in &rows {
                if !full {
                    items.push(Value::String(id.clone()).to_string());
                    continue;
                }
                let payload = match payload {
                    Some(p) => p.clone(),
                    // Under the read lock the record cannot have gone since the scan.
                    None => store
                        .get(uid, &collection, id)
                        .map_err(store_err)?
                        .map(|b| b.payload)
                        .unwrap_or_default(),
                };
                items.push(bso_json(id, meta, &payload));
            }
            let body = match format {
                Format::Json => format!("[{}]", items.join(",")),
                Format::Newlines => items.iter().map(|i| format!("{i}\n")).collect(),
            };
            let mut r = read_answer(body, last);
            if format == Format::Newlines {
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/newlines"),
                );
            }
            r.headers_mut()
                .insert("x-weave-records", HeaderValue::from(rows.len()));
            if more {
                if let Some((key, id, _, _)) = rows.last() {
                    let next = Offset {
                        bound,
                        key: *key,
                        id: id.clone(),
                    };
                    if let Ok(v) = HeaderValue::from_str(&next.encode()) {
                        r.headers_mut().insert("x-weave-next-offset", v);
                    }
                }
            }
            Ok(r)
        })
        .await
}

async fn get_item(
    State(storage): State<Arc<Storage>>,
    Path((uid, collection, id)): Path<(String, String, String)>,
    request: Request,
) -> Result<Response> {
    let req = authed(&storage, &uid, request, false).await?;
    check_collection(&collection)?;
    let pre = Preconditions::parse(&req.parts.headers)?;
    let uid = req.uid;
    storage
        .read(uid, |store| {
            let found = store
                .get(uid, &collection, &id)
                .map_err(store_err)?
                .filter(|b| b.expiry > now_ms());
            pre.check_read(found.as_ref().map_or(0, |b| b.modified))?;
            let b = found.ok_or(StorageError::NotFound)?;
            Ok(read_answer(bso_json(&id, &b.meta(), &b.payload), b.modified))
        })
        .await
}

// ---- writes ----

/// The body's records, as JSON values: a JSON array, or one object per line with
/// `application/newlines`. 415 for other media types; 400 for anything else malformed.
pub fn body_values(parts: &Parts, body: &[u8], list: bool) -> Result<Vec<Value>> {
    let media = header_str(&parts.headers, "content-type")
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let bad = |what: &str| StorageError::invalid(code::INVALID_WBO, what.to_owned());
    match media.as_str() {
        "application/json" | "text/plain" | "" => {
            let value: Value = serde_json::from_slice(body).map_err(|_| bad("body is not JSON"))?;
            match (list, value) {
                (true, Value::Array(values)) => Ok(values),
                (false, value @ Value::Object(_)) => Ok(vec![value]),
                _ => Err(bad("body is not a record list")),
            }
        }
        "application/newlines" if list => {
            if body.is_empty() {
                return Ok(Vec::new());
            }
            let text = std::str::from_utf8(body).map_err(|_| bad("body is not UTF-8"))?;
            let mut lines: Vec<&str> = text.split('\n').collect();
            if lines.len() > 1 && lines.last() == Some(&"") {
                lines.pop();
            }
            lines
                .into_iter()
                .map(|line| serde_json::from_str::<Value>(line).map_err(|_| bad("line is not JSON")))
                .collect()
        }
        _ => Err(StorageError::UnsupportedMediaType),
    }
}

/// The record `update` makes of `existing` at time `ts`: fields it names replace the stored
/// ones; the modified time moves only when the payload or sortindex is sent (a ttl alone
/// only moves the expiry). An expired record counts as absent.
fn merge(existing: Option<StoredBso>, update: &BsoIn, ts: u64) -> StoredBso {
    let expiry_from = |ttl: u64| ts.saturating_add(ttl.saturating_mul(1000));
    match existing {
        Some(old) => StoredBso {
            modified: if update.payload.is_some() || update.sortindex.is_some() {
                ts
            } else {
                old.modified
            },
            expiry: update.ttl.map_or(old.expiry, expiry_from),
            sortindex: update.sortindex.or(old.sortindex),
            payload: update.payload.clone().unwrap_or(old.payload),
        },
        None => StoredBso {
            modified: ts,
            expiry: update.ttl.map_or(NO_EXPIRY, expiry_from),
            sortindex: update.sortindex,
            payload: update.payload.clone().unwrap_or_default(),
        },
    }
}

fn alive(
    store: &dyn StorageStore,
    uid: u64,
    collection: &str,
    id: &str,
    now: u64,
) -> Result<Option<StoredBso>> {
    Ok(store
        .get(uid, collection, id)
        .map_err(store_err)?
        .filter(|b| b.expiry > now))
}

async fn put_item(
    State(storage): State<Arc<Storage>>,
    Path((uid, collection, id)): Path<(String, String, String)>,
    request: Request,
) -> Result<Response> {
    let req = authed(&storage, &uid, request, false).await?;
    check_collection(&collection)?;
    if !bso::valid_id(&id) {
        return Err(StorageError::bad_bso("invalid id"));
    }
    let pre = Preconditions::parse(&req.parts.headers)?;
    let value = body_values(&req.parts, &req.body, false)?
        .pop()
        .ok_or_else(|| StorageError::bad_bso("no record"))?;
    let update = bso::parse_record(&value, storage.record_limits()).map_err(StorageError::bad_bso)?;
    if update.id.as_ref().is_some_and(|given| *given != id) {
        return Err(StorageError::bad_bso("id differs from the URL's"));
    }
    if update
        .payload
        .as_deref()
        .is_some_and(|p| bso::known_bad_payload(&collection, p))
    {
        return Err(StorageError::bad_bso("known-bad payload"));
    }
    let uid = req.uid;
    let (_, ts) = storage
        .write(uid, |store, ts| {
            let existing = alive(store, uid, &collection, &id, now_ms())?;
            pre.check_write(existing.as_ref().map_or(0, |b| b.modified))?;
            storage.check_quota(store, uid, update.payload_len() as u64)?;
            let bso = merge(existing, &update, ts);
            Ok(Outcome {
                changes: vec![
                    Change::Put {
                        collection: collection.clone(),
                        id: id.clone(),
                        bso,
                    },
                    Change::SetCollectionModified {
                        collection: collection.clone(),
                        modified: ts,
                    },
                ],
                data: true,
                value: (),
            })
        })
        .await?;
    Ok(written(&storage, uid, StatusCode::OK, format_ts(ts), ts))
}

/// A POST's records after validation: accepted ones in order, and refusals by id.
pub struct Sorted {
    pub accepted: Vec<BsoIn>,
    pub failed: BTreeMap<String, String>,
}

fn header_count(headers: &HeaderMap, name: &str) -> Result<Option<u64>> {
    header_str(headers, name)
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| StorageError::invalid(code::INVALID_WBO, format!("invalid {name}")))
        })
        .transpose()
}

/// Validates the records of a POST against the per-record and per-POST limits (and, for a
/// batch, what the batch already holds).
pub fn sort_records(
    storage: &Storage,
    collection: &str,
    values: Vec<Value>,
    in_batch: (u64, u64),
) -> Result<Sorted> {
    let config = &storage.config;
    let mut sorted = Sorted {
        accepted: Vec::new(),
        failed: BTreeMap::new(),
    };
    let (mut records, mut bytes) = (0usize, 0usize);
    let (batch_records, batch_bytes) = in_batch;
    for value in values {
        if !value.is_object() {
            return Err(StorageError::bad_bso("a record is not an object"));
        }
        let Some(id) = value.get("id").and_then(Value::as_str).map(str::to_owned) else {
            return Err(StorageError::bad_bso("a record has no id"));
        };
        let record = match bso::parse_record(&value, storage.record_limits()) {
            Ok(r) => r,
            Err(reason) => {
                sorted.failed.insert(id, reason);
                continue;
            }
        };
        if record
            .payload
            .as_deref()
            .is_some_and(|p| bso::known_bad_payload(collection, p))
        {
            return Err(StorageError::bad_bso("known-bad payload"));
        }
        let len = record.payload_len();
        if records >= config.max_post_records
            || batch_records + records as u64 >= config.max_total_records as u64
        {
            sorted.failed.insert(id, "retry bso".into());
            continue;
        }
        if bytes + len > config.max_post_bytes
            || batch_bytes + (bytes + len) as u64 > config.max_total_bytes as u64
        {
            sorted.failed.insert(id, "retry bytes".into());
            continue;
        }
        records += 1;
        bytes += len;
        sorted.accepted.push(record);
    }
    Ok(sorted)
}

/// A new batch id: 16 lowercase hex digits.
fn new_batch_id() -> Result<String> {
    let mut raw = [0u8; 8];
    getrandom::fill(&mut raw).map_err(|e| StorageError::Store(format!("random: {e}")))?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

fn valid_batch_id(id: &str) -> bool {
    id.len() == 16
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn post_body(modified: Option<u64>, batch: Option<&str>, sorted: &Sorted) -> String {
    let success: Vec<&str> = sorted.accepted.iter().filter_map(|r| r.id.as_deref()).collect();
    let mut seen = std::collections::HashSet::new();
    let success: Vec<&str> = success.into_iter().filter(|id| seen.insert(*id)).collect();
    let mut s = String::from("{");
    if let Some(ts) = modified {
        s.push_str(&format!("\"modified\":{},", format_ts(ts)));
    }
    if let Some(batch) = batch {
        s.push_str(&format!("\"batch\":{},", Value::String(batch.to_owned())));
    }
    s.push_str(&format!(
        "\"success\":{},\"failed\":{}}}",
        serde_json::json!(success),
        serde_json::json!(sorted.failed)
    ));
    s
}

/// Puts `records` (applied in order, each merged onto what is stored or what an earlier one
/// made) at time `ts`.
fn put_all(
    store: &dyn StorageStore,
    uid: u64,
    collection: &str,
    records: &[BsoIn],
    ts: u64,
) -> Result<Vec<Change>> {
    let now = now_ms();
    let mut merged: BTreeMap<&str, StoredBso> = BTreeMap::new();
    for record in records {
        let Some(id) = record.id.as_deref() else { continue };
        let existing = match merged.remove(id) {
            Some(b) => Some(b),
            None => alive(store, uid, collection, id, now)?,
        };
        merged.insert(id, merge(existing, record, ts));
    }
    let mut changes: Vec<Change> = merged
        .into_iter()
        .map(|(id, bso)| Change::Put {
            collection: collection.to_owned(),
            id: id.to_owned(),
            bso,
        })
        .collect();
    changes.push(Change::SetCollectionModified {
        collection: collection.to_owned(),
        modified: ts,
    });
    Ok(changes)
}

async fn post_collection(
    State(storage): State<Arc<Storage>>,
    Path((uid, collection)): Path<(String, String)>,
    request: Request,
) -> Result<Response> {
    let req = authed(&storage, &uid, request, false).await?;
    check_collection(&collection)?;
    let config = &storage.config;
    let headers = &req.parts.headers;
    let over = |name: &str, max: usize| -> Result<()> {
        match header_count(headers, name)? {
            Some(n) if n > max as u64 => Err(StorageError::invalid(
                code::SIZE_LIMIT,
                format!("{name} over the limit"),
            )),
            _ => Ok(()),
        }
    };
    over("x-weave-records", config.max_post_records)?;
    over("x-weave-bytes", config.max_post_bytes)?;
    over("x-weave-total-records", config.max_total_records)?;
    over("x-weave-total-bytes", config.max_total_bytes)?;
    let pre = Preconditions::parse(headers)?;
    let q = query(&req.parts)?;
    let commit = matches!(q.get("commit").map(String::as_str), Some("true" | "1"));
    let batch = q.get("batch").cloned();
    let values = body_values(&req.parts, &req.body, true)?;
    let uid = req.uid;
    if batch.is_none() && commit {
        return Err(StorageError::invalid(code::INVALID_WBO, "commit without a batch"));
    }
    let immediate = match batch.as_deref() {
        None => None,
        Some("true") if commit => None,
        Some(b) => Some(b),
    };
    match immediate {
        None => {
            // A plain POST, or a batch created and committed at once.
            let sorted = sort_records(&storage, &collection, values, (0, 0))?;
            let incoming: u64 = sorted.accepted.iter().map(|r| r.payload_len() as u64).sum();
            let (modified, ts) = storage
                .write(uid, |store, ts| {
                    let last = store
                        .collection_modified(uid, &collection)
                        .map_err(store_err)?
                        .unwrap_or(0);
                    pre.check_write(last)?;
                    if sorted.accepted.is_empty() {
                        return Ok(Outcome {
                            changes: Vec::new(),
                            data: false,
                            value: last,
                        });
                    }
                    storage.check_quota(store, uid, incoming)?;
                    Ok(Outcome {
                        changes: put_all(store, uid, &collection, &sorted.accepted, ts)?,
                        data: true,
                        value: ts,
                    })
                })
                .await?;
            let body = post_body(Some(modified), None, &sorted);
            Ok(if modified == ts {
                written(&storage, uid, StatusCode::OK, body, ts)
            } else {
                read_answer(body, modified)
            })
        }
        Some(batch) => {
            let creating = batch == "true";
            if !creating && !valid_batch_id(batch) {
                return Err(StorageError::invalid(code::INVALID_WBO, "invalid batch id"));
            }
            let batch_ttl = config.batch_ttl_secs.saturating_mul(1000);
            let outcome = storage
                .write(uid, |store, ts| {
                    let last = store
                        .collection_modified(uid, &collection)
                        .map_err(store_err)?
                        .unwrap_or(0);
                    pre.check_write(last)?;
                    let (id, meta) = if creating {
                        let meta = BatchMeta {
                            collection: collection.clone(),
                            expiry: now_ms().saturating_add(batch_ttl),
                            records: 0,
                            bytes: 0,
                        };
                        (new_batch_id()?, meta)
                    } else {
                        let meta = store
                            .batch(uid, batch)
                            .map_err(store_err)?
                            .filter(|m| m.expiry > now_ms() && m.collection == collection)
                            .ok_or_else(|| StorageError::invalid(code::INVALID_WBO, "no such batch"))?;
                        (batch.to_owned(), meta)
                    };
                    let sorted = sort_records(&storage, &collection, values, (meta.records, meta.bytes))?;
                    let incoming: u64 = sorted.accepted.iter().map(|r| r.payload_len() as u64).sum();
                    if commit {
                        storage.check_quota(store, uid, meta.bytes + incoming)?;
                        let mut records: Vec<BsoIn> = Vec::new();
                        for item in store.batch_items(uid, &id).map_err(store_err)? {
                            let record: BsoIn = serde_json::from_slice(&item)
                                .map_err(|_| StorageError::Store("corrupt batch item".into()))?;
                            records.push(record);
                        }
                        records.extend(sorted.accepted.iter().cloned());
                        let mut changes = put_all(store, uid, &collection, &records, ts)?;
                        changes.push(Change::DeleteBatch { batch: id.clone() });
                        return Ok(Outcome {
                            changes,
                            data: true,
                            value: (None, sorted, last),
                        });
                    }
                    let mut changes = Vec::new();
                    for (i, record) in sorted.accepted.iter().enumerate() {
                        let item =
                            serde_json::to_vec(record).map_err(|e| StorageError::Store(e.to_string()))?;
                        changes.push(Change::AppendBatch {
                            batch: id.clone(),
                            seq: meta.records + i as u64,
                            item,
                        });
                    }
                    let meta = BatchMeta {
                        records: meta.records + sorted.accepted.len() as u64,
                        bytes: meta.bytes + incoming,
                        ..meta
                    };
                    changes.push(Change::PutBatch {
                        batch: id.clone(),
                        meta,
                    });
                    Ok(Outcome {
                        changes,
                        data: false,
                        value: (Some(id), sorted, last),
                    })
                })
                .await?;
            let ((batch_id, sorted, last), ts) = outcome;
            Ok(match batch_id {
                None => written(
                    &storage,
                    uid,
                    StatusCode::OK,
                    post_body(Some(ts), None, &sorted),
                    ts,
                ),
                Some(id) => {
                    let mut r = json(StatusCode::ACCEPTED, post_body(None, Some(&id), &sorted));
                    set_ts(&mut r, "x-last-modified", last);
                    r
                }
            })
        }
    }
}

async fn delete_collection(
    State(storage): State<Arc<Storage>>,
    Path((uid, collection)): Path<(String, String)>,
    request: Request,
) -> Result<Response> {
    let req = authed(&storage, &uid, request, false).await?;
    check_collection(&collection)?;
    let pre = Preconditions::parse(&req.parts.headers)?;
    let q = query(&req.parts)?;
    let ids = ids_param(&storage, &q)?;
    let uid = req.uid;
    let (modified, ts) = storage
        .write(uid, |store, ts| {
            let last = store.collection_modified(uid, &collection).map_err(store_err)?;
            pre.check_write(last.unwrap_or(0))?;
            let Some(last) = last else {
                let user = store.user_modified(uid).map_err(store_err)?.unwrap_or(0);
                return Ok(Outcome {
                    changes: Vec::new(),
                    data: false,
                    value: user,
                });
            };
            let changes = match &ids {
                None => vec![Change::DeleteCollection {
                    collection: collection.clone(),
                }],
                Some(ids) => {
                    let mut changes = Vec::new();
                    for id in ids {
                        if store.get(uid, &collection, id).map_err(store_err)?.is_some() {
                            changes.push(Change::Delete {
                                collection: collection.clone(),
                                id: id.clone(),
                            });
                        }
                    }
                    if changes.is_empty() {
                        return Ok(Outcome {
                            changes,
                            data: false,
                            value: last,
                        });
                    }
                    changes.push(Change::SetCollectionModified {
                        collection: collection.clone(),
                        modified: ts,
                    });
                    changes
                }
            };
            Ok(Outcome {
                changes,
                data: true,
                value: ts,
            })
        })
        .await?;
    let body = format!("{{\"modified\":{}}}", format_ts(modified));
    Ok(if modified == ts {
        written(&storage, uid, StatusCode::OK, body, ts)
    } else {
        read_answer(body, modified)
    })
}

async fn delete_item(
    State(storage): State<Arc<Storage>>,
    Path((uid, collection, id)): Path<(String, String, String)>,
    request: Request,
) -> Result<Response> {
    let req = authed(&storage, &uid, request, false).await?;
    check_collection(&collection)?;
    let pre = Preconditions::parse(&req.parts.headers)?;
    let uid = req.uid;
    let (_, ts) = storage
        .write(uid, |store, ts| {
            let existing = alive(store, uid, &collection, &id, now_ms())?;
            pre.check_write(existing.as_ref().map_or(0, |b| b.modified))?;
            if existing.is_none() {
                return Err(StorageError::NotFound);
            }
            Ok(Outcome {
                changes: vec![
                    Change::Delete {
                        collection: collection.clone(),
                        id: id.clone(),
                    },
                    Change::SetCollectionModified {
                        collection: collection.clone(),
                        modified: ts,
                    },
                ],
                data: true,
                value: (),
            })
        })
        .await?;
    Ok(written(
        &storage,
        uid,
        StatusCode::OK,
        format!("{{\"modified\":{}}}", format_ts(ts)),
        ts,
    ))
}

/// `DELETE storage?keep=meta/global` (proto/storage.md): the one record a wipe may keep, the
/// sync metadata, so the user's other devices need not upload it again.
const KEEP: (&str, &str) = ("meta", "global");

/// `DELETE /1.5/{uid}` and `DELETE storage`; `keep_allowed`: the latter, which takes `keep`.
async fn delete_everything(
    storage: Arc<Storage>,
    uid: String,
    request: Request,
    keep_allowed: bool,
) -> Result<Response> {
    let req = authed(&storage, &uid, request, false).await?;
    let pre = Preconditions::parse(&req.parts.headers)?;
    let keep = match query(&req.parts)?.get("keep") {
        None => false,
        Some(k) if keep_allowed && k.split_once('/') == Some(KEEP) => true,
        Some(_) => {
            return Err(StorageError::invalid(
                code::INVALID_WBO,
                "keep: only meta/global, and only on DELETE storage",
            ))
        }
    };
    let uid = req.uid;
    let (_, ts) = storage
        .write(uid, |store, ts| {
            pre.check_write(store.user_modified(uid).map_err(store_err)?.unwrap_or(0))?;
            if !keep {
                return Ok(Outcome {
                    changes: vec![Change::DeleteAll],
                    data: true,
                    value: (),
                });
            }
            let (collection, id) = KEEP;
            let mut changes = vec![Change::DeleteAllExcept {
                collection: collection.into(),
                id: id.into(),
            }];
            // The kept record's collection moves only if it loses other records.
            let kept = store.get(uid, collection, id).map_err(store_err)?.is_some();
            let others = store
                .scan_meta(uid, collection)
                .map_err(store_err)?
                .iter()
                .any(|(other, _)| other != id);
            if kept && others {
                changes.push(Change::SetCollectionModified {
                    collection: collection.into(),
                    modified: ts,
                });
            }
            Ok(Outcome {
                changes,
                data: true,
                value: (),
            })
        })
        .await?;
    Ok(written(
        &storage,
        uid,
        StatusCode::OK,
        format!("{{\"modified\":{}}}", format_ts(ts)),
        ts,
    ))
}

async fn delete_storage(
    State(storage): State<Arc<Storage>>,
    Path(uid): Path<String>,
    request: Request,
) -> Result<Response> {
    delete_everything(storage, uid, request, true).await
}

async fn delete_user(
    State(storage): State<Arc<Storage>>,
    Path(uid): Path<String>,
    request: Request,
) -> Result<Response> {
    delete_everything(storage, uid, request, false).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_round_trip_and_refuse_garbage() {
        let o = Offset {
            bound: 1_234_560,
            key: -42,
            id: "a.b/c d".into(),
        };
        assert_eq!(Offset::decode(&o.encode()), Some(o));
        assert_eq!(Offset::decode("nope"), None);
        assert_eq!(Offset::decode("1.2.!!"), None);
    }

    #[test]
    fn a_ttl_alone_moves_only_the_expiry() {
        let old = StoredBso {
            modified: 1000,
            expiry: 5000,
            sortindex: Some(3),
            payload: "x".into(),
        };
        let ttl_only = BsoIn {
            id: None,
            payload: None,
            sortindex: None,
            ttl: Some(10),
        };
        let m = merge(Some(old.clone()), &ttl_only, 2000);
        assert_eq!(
            (m.modified, m.expiry, m.sortindex, m.payload.as_str()),
            (1000, 12_000, Some(3), "x")
        );
        let fresh = merge(None, &ttl_only, 2000);
        assert_eq!((fresh.modified, fresh.payload.as_str()), (2000, ""));
        let payload = BsoIn {
            payload: Some("y".into()),
            ..ttl_only
        };
        let m = merge(Some(old), &payload, 2000);
        assert_eq!(
            (m.modified, m.payload.as_str(), m.sortindex),
            (2000, "y", Some(3))
        );
    }

    #[test]
    fn accept_header_picks_json_or_newlines() {
        let mut h = HeaderMap::new();
        assert!(matches!(accept(&h), Ok(Format::Json)));
        h.insert(header::ACCEPT, HeaderValue::from_static("application/newlines"));
        assert!(matches!(accept(&h), Ok(Format::Newlines)));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/html;q=0.9,*/*;q=0.2"),
        );
        assert!(matches!(accept(&h), Ok(Format::Json)));
        h.insert(header::ACCEPT, HeaderValue::from_static("x/yy"));
        assert!(matches!(accept(&h), Err(StorageError::NotAcceptable)));
    }
}
