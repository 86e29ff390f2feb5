//! Cross-node routing on Redis: which node holds which UAID, and how a PUT on one node reaches
//! a connection on another.
//!
//! Why: behind a load balancer the PUT for a UAID lands on any node, while its connection lives
//! on one. Each node records the UAIDs it holds in the UAID's `route` hash (`node`, `epoch`); a
//! PUT stores its event first, then nudges the holder over Redis pub/sub (a per-node channel;
//! sharded pub/sub on a cluster). The nudge carries no event: the holder reads the store.
//!
//! Epochs: a claim takes a fresh epoch in the claim script (the larger of Redis `TIME` in µs and
//! the last epoch + 1, so it only grows, even after the entry expired). A node removes its entry
//! only with compare-and-delete on its epoch, so a connection that closes late never removes the
//! newer connection's entry, and a node told "lost at epoch E" drops only an older holding. One
//! UAID therefore has one live connection across all nodes, as on one node.
//!
//! Losing a nudge loses nothing, it only delays: every `recheck_interval_secs` each node renews
//! the route of every UAID it holds (compare-epoch) and, in the same script, learns whether it
//! has pending events; those with some are re-read and sent. After a pub/sub disconnection it
//! does so as soon as Redis answers again. A node that dies leaves routes that expire after
//! `route_ttl_secs`; its clients reconnect elsewhere, claim anew and read what is pending.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use redis::{PushInfo, PushKind, Script};
use tokio::sync::{mpsc, Notify};

use crate::config::StoreConfig;
use crate::ids::Uaid;
use crate::push::delivery::Delivery;
use crate::store::redis::{bounded, key, RedisConn, RedisStore, RedisTarget};
use crate::store::{Result, StoreError};

/// KEYS: route. ARGV: node, ttl_ms. Returns {epoch, previous node or ''}.
const LUA_CLAIM: &str = r#"
local prev = redis.call('HGET', KEYS[1], 'node')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local e = string.format('%.0f', math.max(seq + 1, now))
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'epoch', e, 'seq', e)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {e, prev or ''}
"#;

/// KEYS: route. ARGV: epoch. Compare-and-delete of a holding.
const LUA_RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'node', 'epoch')
  return 1
end
return 0
"#;

/// KEYS: route, pend. ARGV: epoch, ttl_ms. Returns {status, pending events}: status 1 renewed,
/// 0 held by another epoch, -1 held by nobody. One call per held UAID per re-check.
const LUA_TOUCH: &str = r#"
local e = redis.call('HGET', KEYS[1], 'epoch')
local status = -1
if e == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  status = 1
elseif e then
  status = 0
end
return {status, redis.call('HLEN', KEYS[2])}
"#;

/// Nudges queued from pub/sub before the listener drains them; beyond it, a full re-check.
const INBOX_CAPACITY: usize = 65_536;
/// UAIDs re-checked concurrently (pipelined on one connection).
const RECHECK_BATCH: usize = 128;
/// Wait before retrying a re-check that failed (Redis unreachable).
const RECHECK_RETRY: Duration = Duration::from_secs(1);

/// What a node's channel carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Note {
    /// New events may be pending for this UAID.
    Nudge(Uaid),
    /// A connection on another node claimed this UAID at this epoch.
    Lost(Uaid, u64),
}

impl Note {
    fn encode(&self) -> String {
        match self {
            Note::Nudge(u) => format!("n {u}"),
            Note::Lost(u, e) => format!("l {u} {e}"),
        }
    }

    fn decode(text: &str) -> Option<Note> {
        let mut parts = text.split(' ');
        let kind = parts.next()?;
        let uaid = Uaid::parse(parts.next()?).ok()?;
        match (kind, parts.next()) {
            ("n", None) => Some(Note::Nudge(uaid)),
            ("l", Some(e)) => Some(Note::Lost(uaid, u64::from_str(e).ok()?)),
            _ => None,
        }
    }
}

/// What a UAID's route entry said when a nudge looked it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteEntry {
    /// Another node holds it; the nudge was published to that node.
    OtherNode,
    /// This node's entry (a connection here that closed a moment ago, or is claiming).
    ThisNode,
    /// No node holds it.
    None,
}

/// This node's holding of a UAID.
#[derive(Debug, Clone, Copy)]
struct Held {
    conn_id: u64,
    epoch: u64,
}

/// The routing half of the Redis backend; one per node.
pub struct NodeRoutes {
    /// Random per process start: a restarted node is a new node, its old routes stale.
    node: String,
    cluster: bool,
    conn: RedisConn,
    timeout: Duration,
    route_ttl_ms: u64,
    recheck_interval: Duration,
    /// UAID → (connection, epoch) for the UAIDs this node holds in Redis.
    held: DashMap<Uaid, Held>,
    claim: Script,
    release: Script,
    touch: Script,
    /// Wakes the re-check loop early: pub/sub disconnected or the inbox overflowed.
    recheck_now: Arc<Notify>,
    /// The subscriber connection; the re-check pings it, which makes it reconnect (and
    /// resubscribe) after an outage longer than its own retries.
    subscriber: RedisConn,
}

/// Where the pub/sub connection pushes notes; on overflow or disconnection, a full re-check.
struct Inbox {
    tx: mpsc::Sender<Note>,
    recheck_now: Arc<Notify>,
}

impl NodeRoutes {
    /// Subscribes to this node's channel and returns the router and the receiving end of its
    /// inbox, to hand to [`listen`].
    pub async fn start(
        store: &RedisStore,
        target: &RedisTarget,
        config: &StoreConfig,
    ) -> Result<(Arc<NodeRoutes>, RoutesInbox)> {
        let node = uuid::Uuid::new_v4().simple().to_string();
        let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
        let recheck_now = Arc::new(Notify::new());
        let inbox = Inbox {
            tx,
            recheck_now: recheck_now.clone(),
        };
        let push = move |info: PushInfo| -> std::result::Result<(), ()> {
            inbox.push(info);
            Ok(())
        };
        let mut subscriber = target.connect(Some(push)).await?;
        let channel = key::node_channel(&node);
        let subscribed = match &mut subscriber {
            RedisConn::Single(c) => bounded(target.timeout, c.subscribe(&channel)).await,
            RedisConn::Cluster(c) => bounded(target.timeout, c.ssubscribe(&channel)).await,
        };
        subscribed?;
        let router = Arc::new(NodeRoutes {
            node,
            cluster: target.is_cluster(),
            conn: store.conn(),
            timeout: store.timeout(),
            route_ttl_ms: config.route_ttl_secs.saturating_mul(1000),
            recheck_interval: Duration::from_secs(config.recheck_interval_secs),
            held: DashMap::new(),
            claim: Script::new(LUA_CLAIM),
            release: Script::new(LUA_RELEASE),
            touch: Script::new(LUA_TOUCH),
            recheck_now,
            subscriber,
        });
        tracing::info!(node = %router.node, "routing over Redis pub/sub");
        Ok((router, RoutesInbox { rx }))
    }

    /// Records that connection `conn_id` on this node holds `uaid`; tells a previous holder on
    /// another node that it lost it.
    pub async fn claim(&self, uaid: Uaid, conn_id: u64) -> Result<()> {
        let mut conn = self.conn.clone();
        let reply: Vec<String> = bounded(
            self.timeout,
            self.claim
                .key(key::route(&uaid))
                .arg(&self.node)
                .arg(self.route_ttl_ms)
                .invoke_async(&mut conn),
        )
        .await?;
        let [epoch, previous] = reply.as_slice() else {
            return Err(StoreError::Corrupt("claim reply"));
        };
        let epoch: u64 = epoch.parse().map_err(|_| StoreError::Corrupt("route epoch"))?;
        self.held
            .entry(uaid)
            .and_modify(|h| {
                if epoch > h.epoch {
                    *h = Held { conn_id, epoch };
                }
            })
            .or_insert(Held { conn_id, epoch });
        if !previous.is_empty() && *previous != self.node {
            // Best effort: if this is lost, the other node's re-check finds the newer epoch.
            if let Err(e) = self.publish(previous, Note::Lost(uaid, epoch)).await {
                tracing::debug!(error = %e, "lost-notice not sent");
            }
        }
        Ok(())
    }

    /// Stops holding `uaid` for `conn_id` (if it still does): compare-and-delete in Redis, in
    /// the background so a closing connection never waits.
    pub fn release(self: &Arc<Self>, uaid: Uaid, conn_id: u64) {
        let Some((_, held)) = self.held.remove_if(&uaid, |_, h| h.conn_id == conn_id) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let router = self.clone();
        runtime.spawn(async move {
            let mut conn = router.conn.clone();
            let released: Result<i64> = bounded(
                router.timeout,
                router
                    .release
                    .key(key::route(&uaid))
                    .arg(held.epoch)
                    .invoke_async(&mut conn),
            )
            .await;
            if let Err(e) = released {
                // The entry expires after route_ttl_secs; a PUT meanwhile nudges nobody useful.
                tracing::debug!(error = %e, "route release failed");
            }
        });
    }

    /// Tells the node holding `uaid`, if another node holds it, that new events may be pending.
    pub async fn nudge_remote(&self, uaid: Uaid) -> Result<RouteEntry> {
        let mut hget = redis::cmd("HGET");
        hget.arg(key::route(&uaid)).arg("node");
        let mut conn = self.conn.clone();
        let holder: Option<String> = bounded(self.timeout, hget.query_async(&mut conn)).await?;
        match holder {
            Some(node) if node != self.node => {
                self.publish(&node, Note::Nudge(uaid)).await?;
                Ok(RouteEntry::OtherNode)
            }
            Some(_) => Ok(RouteEntry::ThisNode),
            None => Ok(RouteEntry::None),
        }
    }

    /// Whether any node (this one included) has a route entry for `uaid`: a KICK asks before
    /// each attempt whether the client is still away.
    pub async fn is_routed(&self, uaid: Uaid) -> Result<bool> {
        let mut hexists = redis::cmd("HEXISTS");
        hexists.arg(key::route(&uaid)).arg("node");
        let mut conn = self.conn.clone();
        bounded(self.timeout, hexists.query_async(&mut conn)).await
    }

    async fn publish(&self, node: &str, note: Note) -> Result<()> {
        let mut cmd = redis::cmd(if self.cluster { "SPUBLISH" } else { "PUBLISH" });
        cmd.arg(key::node_channel(node)).arg(note.encode());
        let mut conn = self.conn.clone();
        let _: i64 = bounded(self.timeout, cmd.query_async(&mut conn)).await?;
        Ok(())
    }

    /// Renews every route this node holds and marks each UAID for a re-read of its pending
    /// events; drops holdings another node took; re-claims routes that vanished.
    async fn recheck(self: &Arc<Self>, delivery: &Delivery) -> Result<()> {
        // Pinging both connections makes each reconnect (the subscriber also resubscribes) as
        // soon as Redis is back, before any request needs it.
        for conn in [&self.subscriber, &self.conn] {
            let mut conn = conn.clone();
            let _: String = bounded(self.timeout, redis::cmd("PING").query_async(&mut conn)).await?;
        }
        let mut held: Vec<(Uaid, Held)> = self.held.iter().map(|e| (*e.key(), *e.value())).collect();
        // An entry whose connection no longer holds the UAID here (it failed to claim, or was
        // closing) is released rather than renewed.
        held.retain(|(uaid, h)| {
            let live = delivery.registry.is_held_by(*uaid, h.conn_id);
            if !live {
                self.release(*uaid, h.conn_id);
            }
            live
        });
        for batch in held.chunks(RECHECK_BATCH) {
            let touches = batch.iter().map(|(uaid, h)| async move {
                let mut conn = self.conn.clone();
                let status: Result<(i64, u64)> = bounded(
                    self.timeout,
                    self.touch
                        .key(key::route(uaid))
                        .key(key::pending(uaid))
                        .arg(h.epoch)
                        .arg(self.route_ttl_ms)
                        .invoke_async(&mut conn),
                )
                .await;
                (*uaid, *h, status)
            });
            for (uaid, h, status) in futures_util::future::join_all(touches).await {
                let (status, pending) = status?;
                match status {
                    1 => {}
                    0 => {
                        if self
                            .held
                            .remove_if(&uaid, |_, cur| cur.epoch == h.epoch)
                            .is_some()
                        {
                            delivery.registry.evict(uaid, h.conn_id);
                        }
                        continue;
                    }
                    _ => {
                        // Redis lost the entry (expired, or data lost): this node still holds it.
                        if self.held.get(&uaid).is_some_and(|cur| cur.epoch == h.epoch) {
                            self.claim(uaid, h.conn_id).await?;
                        }
                    }
                }
                if pending > 0 {
                    delivery.registry.nudge(uaid);
                }
            }
        }
        Ok(())
    }

    fn on_note(&self, delivery: &Delivery, note: Note) {
        match note {
            Note::Nudge(uaid) => {
                delivery.registry.nudge(uaid);
            }
            Note::Lost(uaid, epoch) => {
                if let Some((_, h)) = self.held.remove_if(&uaid, |_, h| h.epoch < epoch) {
                    delivery.registry.evict(uaid, h.conn_id);
                }
            }
        }
    }

    /// UAIDs this node holds in Redis.
    pub fn held_count(&self) -> usize {
        self.held.len()
    }
}

impl Inbox {
    /// Called by the Redis connection for every push; must not block.
    fn push(&self, info: PushInfo) {
        match info.kind {
            PushKind::Message | PushKind::SMessage => {
                let payload = info.data.last().and_then(|v| match v {
                    redis::Value::BulkString(b) => std::str::from_utf8(b).ok().and_then(Note::decode),
                    redis::Value::SimpleString(s) => Note::decode(s),
                    _ => None,
                });
                if let Some(note) = payload {
                    if self.tx.try_send(note).is_err() {
                        self.recheck_now.notify_one();
                    }
                }
            }
            // Nudges sent while we were away are gone: re-check (retrying until Redis is back).
            PushKind::Disconnection => self.recheck_now.notify_one(),
            _ => {}
        }
    }
}

/// The receiving end of a router's pub/sub inbox.
pub struct RoutesInbox {
    rx: mpsc::Receiver<Note>,
}

/// Applies pub/sub notes to the local registry until shutdown.
pub async fn listen(delivery: Delivery, router: Arc<NodeRoutes>, mut inbox: RoutesInbox) {
    let stopping = delivery.lifecycle.stopping();
    tokio::pin!(stopping);
    loop {
        let note = tokio::select! {
            note = inbox.rx.recv() => note,
            _ = &mut stopping => return,
        };
        let Some(note) = note else { return };
        router.on_note(&delivery, note);
    }
}

/// Re-checks held UAIDs every `recheck_interval_secs`, or at once when woken; retries every
/// second while Redis is unreachable.
pub async fn recheck_loop(delivery: Delivery, router: Arc<NodeRoutes>) {
    let stopping = delivery.lifecycle.stopping();
    tokio::pin!(stopping);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(router.recheck_interval) => {}
            _ = router.recheck_now.notified() => {}
            _ = &mut stopping => return,
        }
        while let Err(e) = router.recheck(&delivery).await {
            tracing::warn!(error = %e, "route re-check failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(RECHECK_RETRY) => {}
                _ = &mut stopping => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_round_trip() {
        let u = Uaid::random();
        for note in [Note::Nudge(u), Note::Lost(u, 1_700_000_000_000_123)] {
            assert_eq!(Note::decode(&note.encode()), Some(note));
        }
        assert_eq!(Note::decode("x y"), None);
        assert_eq!(Note::decode(&format!("n {u} 5")), None);
    }
}
