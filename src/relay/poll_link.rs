//! The upstream link over outbound HTTP only (`relay.transport = "poll"`): the book's UAIDs in
//! chunks of at most `max_uaids_per_frame`, one long poll per chunk (`POST /v1/poll?wait=`),
//! each answer stored durably and then ACKed (`POST /v1/ack`); a chunk that changes (a UAID
//! learnt or forgotten) drops its poll and starts a new one, and chunks beyond a shrunk book
//! end. Claims are a poll with `wait=0`; registers and unregisters are `POST /v1/register` and
//! `/v1/unregister`.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{backoff, store_updates, Relay, RelayConfig, RelayError, Updates};
use crate::ids::{Appid, Uaid};
use crate::push::delivery::Delivery;
use crate::push::proto::{Credential, RegistrationReply, StatusEntry};

/// The HTTP client of the upstream, and what every call needs.
pub struct Http {
    client: reqwest::Client,
    base: String,
    wait_secs: u64,
    timeout: Duration,
}

/// A poll answer: `{"uaids"?:[…],"updates":{…}}`.
#[derive(Deserialize)]
struct PollAnswer {
    #[serde(default)]
    uaids: Option<Vec<StatusEntry>>,
    #[serde(default)]
    updates: Updates,
}

/// An error body: `{"status","error","message"}`.
#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    message: Option<String>,
}

impl Http {
    pub fn new(config: &RelayConfig) -> Result<Http, RelayError> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| RelayError::Unreachable(e.to_string()))?;
        Ok(Http {
            client,
            base: config.base_url(),
            wait_secs: config.poll_wait_secs,
            timeout: Duration::from_secs(config.request_timeout_secs),
        })
    }

    async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<(StatusCode, bytes::Bytes), RelayError> {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| RelayError::Unreachable(e.without_url().to_string()))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| RelayError::Unreachable(e.without_url().to_string()))?;
        if status.is_server_error() {
            return Err(RelayError::Unreachable(format!("upstream answered {status}")));
        }
        Ok((status, body))
    }

    /// Claims one entry: a poll with `wait=0`. Its events, if any, stay pending upstream (not
    /// ACKed) for the chunk poll that the new book entry starts.
    pub async fn claim(&self, entry: &Credential) -> Result<StatusEntry, RelayError> {
        let body = serde_json::json!({"uaids": [credential_json(entry)]});
        let (status, bytes) = self.post("/v1/poll?wait=0", &body, self.timeout).await?;
        let ok = StatusEntry {
            uaid: entry.uaid.clone(),
            status: 200,
            secret: None,
            error: None,
            message: None,
            retry_after: None,
        };
        match status {
            StatusCode::NO_CONTENT => Ok(ok),
            StatusCode::OK => {
                let answer: PollAnswer =
                    serde_json::from_slice(&bytes).map_err(|e| RelayError::Protocol(e.to_string()))?;
                Ok(answer.uaids.and_then(|mut u| u.pop()).unwrap_or(ok))
            }
            other => {
                let error: ErrorBody =
                    serde_json::from_slice(&bytes).map_err(|e| RelayError::Protocol(e.to_string()))?;
                Ok(StatusEntry {
                    uaid: entry.uaid.clone(),
                    status: other.as_u16(),
                    secret: None,
                    error: Some(error.error),
                    message: error.message,
                    retry_after: None,
                })
            }
        }
    }

    /// `POST /v1/register` (`register`) or `/v1/unregister`: the reply is the WebSocket frame's.
    pub async fn registration(
        &self,
        register: bool,
        uaid: Uaid,
        secret: &str,
        appid: Appid,
    ) -> Result<RegistrationReply, RelayError> {
        let path = if register {
            "/v1/register"
        } else {
            "/v1/unregister"
        };
        let body =
            serde_json::json!({"uaid": uaid.to_string(), "secret": secret, "appid": appid.to_string()});
        let (_, bytes) = self.post(path, &body, self.timeout).await?;
        serde_json::from_slice(&bytes).map_err(|e| RelayError::Protocol(e.to_string()))
    }

    /// One long poll for `creds`: the updates, or `None` (204).
    async fn poll(&self, creds: &[(Uaid, String)]) -> Result<Option<Updates>, RelayError> {
        let body = serde_json::json!({"uaids": credentials_json(creds.iter())});
        let path = format!("/v1/poll?wait={}", self.wait_secs);
        let timeout = self.timeout + Duration::from_secs(self.wait_secs);
        let (status, bytes) = self.post(&path, &body, timeout).await?;
        match status {
            StatusCode::NO_CONTENT => Ok(None),
            StatusCode::OK => serde_json::from_slice::<PollAnswer>(&bytes)
                .map(|a| Some(a.updates))
                .map_err(|e| RelayError::Protocol(e.to_string())),
            other => Err(refused(other, &bytes)),
        }
    }

    /// ACKs exactly `updates` for the UAIDs of `creds` they name.
    async fn ack(&self, creds: &[(Uaid, String)], updates: &Updates) -> Result<(), RelayError> {
        let named = creds.iter().filter(|(u, _)| updates.contains_key(&u.to_string()));
        let body = serde_json::json!({"uaids": credentials_json(named), "updates": updates});
        let (status, bytes) = self.post("/v1/ack", &body, self.timeout).await?;
        if status == StatusCode::OK {
            Ok(())
        } else {
            Err(refused(status, &bytes))
        }
    }

    /// Whether the upstream answers at all (`GET /health`), while there is nothing to poll.
    async fn probe(&self) -> Result<(), RelayError> {
        self.client
            .get(format!("{}/health", self.base))
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| RelayError::Unreachable(e.without_url().to_string()))?;
        Ok(())
    }
}

/// The credentials one long poll carries.
type Chunk = Vec<(Uaid, String)>;

/// Runs the polls until shutdown: one task per chunk of the book, re-chunked as it changes.
pub async fn run(delivery: Delivery, relay: Arc<Relay>, http: Arc<Http>) {
    let mut book = relay.book.watch();
    let mut chunks: Vec<(watch::Sender<Chunk>, JoinHandle<()>)> = Vec::new();
    let every = Duration::from_secs(relay.config.ping_interval_secs);
    let mut probe = tokio::time::interval(every);
    let stopping = delivery.lifecycle.stopping();
    tokio::pin!(stopping);
    loop {
        let all = relay.book.all();
        let wanted = all.chunks(relay.max_per_frame).count();
        for (i, chunk) in all.chunks(relay.max_per_frame).enumerate() {
            match chunks.get(i) {
                Some((tx, _)) => {
                    tx.send_if_modified(|held| {
                        let changed = held.as_slice() != chunk;
                        if changed {
                            *held = chunk.to_vec();
                        }
                        changed
                    });
                }
                None => {
                    let (tx, rx) = watch::channel(chunk.to_vec());
                    let task = tokio::spawn(chunk_loop(delivery.clone(), relay.clone(), http.clone(), rx));
                    chunks.push((tx, task));
                }
            }
        }
        // The book shrank (UAIDs forgotten): the polls of the chunks past its end stop.
        for (_, task) in chunks.drain(wanted.min(chunks.len())..) {
            task.abort();
        }
        tokio::select! {
            changed = book.changed() => if changed.is_err() { break },
            _ = probe.tick(), if chunks.is_empty() => match http.probe().await {
                Ok(()) => relay.link_up(),
                Err(e) => relay.link_down(&e),
            },
            _ = &mut stopping => break,
        }
    }
    for (_, task) in chunks {
        task.abort();
    }
}

/// Polls one chunk for ever, restarting the poll when the chunk changes.
async fn chunk_loop(
    delivery: Delivery,
    relay: Arc<Relay>,
    http: Arc<Http>,
    mut creds: watch::Receiver<Chunk>,
) {
    let mut attempt = 0u32;
    loop {
        let current = creds.borrow_and_update().clone();
        let round = tokio::select! {
            round = poll_round(&delivery, &relay, &http, &current) => round,
            changed = creds.changed() => match changed {
                Ok(()) => continue,
                Err(_) => return,
            },
        };
        match round {
            Ok(()) => attempt = 0,
            Err(e) => {
                relay.link_down(&e);
                tokio::time::sleep(backoff(&relay.config, attempt)).await;
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

/// One poll; what it brings is stored durably, then ACKed upstream.
async fn poll_round(
    delivery: &Delivery,
    relay: &Relay,
    http: &Http,
    creds: &[(Uaid, String)],
) -> Result<(), RelayError> {
    let answer = http.poll(creds).await?;
    relay.link_up();
    if let Some(updates) = answer.filter(|u| !u.is_empty()) {
        store_updates(delivery, relay, &updates).await?;
        http.ack(creds, &updates).await?;
    }
    Ok(())
}

fn refused(status: StatusCode, body: &[u8]) -> RelayError {
    let slug = serde_json::from_slice::<ErrorBody>(body).map_or_else(|_| status.to_string(), |b| b.error);
    RelayError::Refused(slug)
}

fn credential_json(c: &Credential) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    if let Some(uaid) = &c.uaid {
        m.insert("uaid".into(), uaid.clone().into());
    }
    if let Some(secret) = &c.secret {
        m.insert("secret".into(), secret.clone().into());
    }
    serde_json::Value::Object(m)
}

fn credentials_json<'a>(creds: impl Iterator<Item = &'a (Uaid, String)>) -> serde_json::Value {
    creds
        .map(|(uaid, secret)| serde_json::json!({"uaid": uaid.to_string(), "secret": secret}))
        .collect()
}
