//! The shared store: several editiond nodes on one Redis 7 server or one Redis Cluster.
//!
//! Why Redis: one machine's sled store cannot be shared, so scaling out needs state every node
//! reads and writes. Every read-modify-write is one Lua script on keys of one UAID, which Redis
//! runs atomically, so the compare-and-set of a PUT and the compare-and-delete of an ACK keep
//! exactly the sled semantics under any number of nodes.
//!
//! Key shapes (each built by one function in [`key`]); `{u}` is the UAID in its wire form and a
//! cluster hash tag, so all of one UAID's keys live in one hash slot and every script runs on one
//! shard without CROSSSLOT errors:
//! * `ed:{u}:bound` — string, bound-at ms: the UAID was bound (its secret may be issued).
//! * `ed:{u}:tok` — hash APPID → token id (hex): the registrations; `HLEN` counts them.
//! * `ed:{u}:last` — hash APPID → last known version, 20-digit zero-padded decimal so that
//!   versions up to 2^64-1 compare exactly (Lua numbers are doubles).
//! * `ed:{u}:kick` — hash APPID → KICK settings (JSON), only for registrations that have some.
//! * `ed:{u}:pend` — hash APPID → `version:expires_ms`: the pending events. Reads skip expired ones.
//! * `ed:tok:<hex>` — string per token: `uaid/appid`, or `gone` (the tombstone, which also has a
//!   Redis expiry at its time as a backstop).
//! * `ed:{u}:route` — which node holds the UAID (see `crate::route`).
//! * `ed:{t}:exp` — sorted set per hash slot (`t` a short tag chosen to hash to that slot; on a
//!   single server one set `ed:exp`): what expires when, members `e:<uaid>/<appid>` (events) and
//!   `t:<hex>` (tombstones), score expires_ms. Because it lives in the same slot as the keys it
//!   indexes, the scripts that raise, clear and unregister keep it exact atomically, and the sweep
//!   finds expired entries without scanning the keyspace (one cheap read per slot per sweep).
//! * `ed:pending-count` — the pending-event gauge: each node adds its net change at every sweep.
//!
//! Register and unregister touch two slots (the UAID's and the token's), so they are two steps
//! ordered so that a crash between them leaves nothing visible: register writes the token index
//! first (a token nobody was given), unregister deletes the registration first (its token then
//! leads to a missing registration, which a PUT reports as Gone).
//!
//! Durability: a successful call means the Redis primary applied the write (and, for a script,
//! all of it). Whether it survives a Redis crash is Redis's persistence policy: with
//! `appendonly yes` and `appendfsync always` an acknowledged write is on disk; with `everysec`
//! up to about one second of acknowledged writes can be lost on a crash of the Redis host; with
//! no AOF, everything since the last snapshot. A failover to a replica can lose what was not yet
//! replicated. [`Store::sync`] is therefore a no-op here: there is nothing to wait for.
//!
//! Expiry: [`Store::sweep`] deletes events and tombstones whose time has passed, through the
//! expiry index. Tombstones also carry a Redis expiry, so a cluster nobody sweeps still forgets
//! them. `pending_count` is this node's view: the shared counter as of the last sweep plus this
//! node's own changes since (a node killed between sweeps loses its unflushed changes to the
//! gauge, never an event).
//!
//! Every call has a bounded time (`store.redis_timeout_ms`), and the connection reconnects by
//! itself, so an outage turns into errors (503 on PUT) and then heals without a restart.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{AsyncPushSender, ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, Pipeline, ProtocolVersion, RedisFuture, Script, Value};

use super::MAX_SERVER_VERSION;
use super::{
    CommitTicket, KickChange, PutOutcome, Registered, Result, Store, StoreError, SweepStats, TokenTarget,
    VersionReq,
};
use crate::ids::TokenId;
use crate::ids::{Appid, Uaid};

/// Key and channel names: one function per shape, nothing else formats a key.
pub mod key {
    use crate::ids::TokenId;
    use crate::ids::Uaid;

    pub fn bound(u: &Uaid) -> String {
        format!("ed:{{{u}}}:bound")
    }
    pub fn tokens(u: &Uaid) -> String {
        format!("ed:{{{u}}}:tok")
    }
    pub fn last(u: &Uaid) -> String {
        format!("ed:{{{u}}}:last")
    }
    pub fn kick(u: &Uaid) -> String {
        format!("ed:{{{u}}}:kick")
    }
    pub fn pending(u: &Uaid) -> String {
        format!("ed:{{{u}}}:pend")
    }
    pub fn route(u: &Uaid) -> String {
        format!("ed:{{{u}}}:route")
    }
    pub fn token(id: &TokenId) -> String {
        format!("ed:tok:{}", super::token_hex(id))
    }
    /// The expiry index for the hash slot of `slot_key` (`None`: one index, single server).
    pub fn expiry_index(slot_key: Option<&str>) -> String {
        match slot_key {
            None => "ed:exp".to_owned(),
            Some(k) => format!("ed:{{{}}}:exp", super::slot::tag(super::slot::of(k))),
        }
    }
    /// The idle index (UAID → last seen) for the hash slot of `slot_key` (`None`: one index).
    pub fn idle_index(slot_key: Option<&str>) -> String {
        match slot_key {
            None => "ed:idle".to_owned(),
            Some(k) => format!("ed:{{{}}}:idle", super::slot::tag(super::slot::of(k))),
        }
    }
    /// The idle index of one hash slot, for the sweep.
    pub fn idle_index_of_slot(slot: u16) -> String {
        format!("ed:{{{}}}:idle", super::slot::tag(slot))
    }
    /// The expiry index of one hash slot, for the sweep.
    pub fn expiry_index_of_slot(slot: u16) -> String {
        format!("ed:{{{}}}:exp", super::slot::tag(slot))
    }
    /// Index member of a pending event.
    pub fn event_member(u: &Uaid, a: &crate::ids::Appid) -> String {
        format!("e:{u}/{a}")
    }
    /// Index member of a tombstone.
    pub fn tombstone_member(id: &TokenId) -> String {
        format!("t:{}", super::token_hex(id))
    }
    /// The shared pending-event gauge.
    pub fn pending_count() -> &'static str {
        "ed:pending-count"
    }
    /// The endpoint and secret keys shared by every node (when config names none).
    pub fn server_keys() -> &'static str {
        "ed:server-keys"
    }
    /// Which keys this Redis's data was written with: their digest (`Keys::id`, never the keys),
    /// written with generated keys or, for keys from config, by the first node. It outlives a
    /// deleted `ed:server-keys`, so a lost key is told from a Redis that never had one. The hash
    /// tag puts it in the slot of `ed:server-keys`, so one script writes both (also on a cluster).
    pub fn keys_id() -> &'static str {
        "ed:keys-id:{ed:server-keys}"
    }
    /// Where `serve --reset-keys` keeps the keys it replaced (in the slot of `ed:server-keys`).
    pub fn replaced_keys(unix_secs: u64) -> String {
        format!("ed:server-keys-replaced-{unix_secs}:{{ed:server-keys}}")
    }
    /// The KICK drivers' generated secrets (webhook secret, VAPID key), shared by every node.
    pub fn kick_keys() -> &'static str {
        "ed:kick-keys"
    }
    /// A node's nudge channel; the node id is a hash tag so sharded pub/sub maps it to one slot.
    pub fn node_channel(node: &str) -> String {
        format!("ed:node:{{{node}}}")
    }
}

/// Redis Cluster hash slots, so that an expiry index can be placed in the slot of the keys it
/// indexes: CRC16 (XMODEM) of the key or of its `{hash tag}`, modulo 16384.
pub mod slot {
    use std::sync::LazyLock;

    pub const SLOTS: u16 = 16384;

    fn crc16(data: &[u8]) -> u16 {
        let mut crc: u16 = 0;
        for &b in data {
            crc ^= u16::from(b) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
            }
        }
        crc
    }

    /// The slot of a key, honouring a non-empty `{hash tag}`.
    pub fn of(key: &str) -> u16 {
        let hashed = key
            .find('{')
            .and_then(|open| {
                let rest = &key[open + 1..];
                rest.find('}')
                    .filter(|&close| close > 0)
                    .map(|close| &rest[..close])
            })
            .unwrap_or(key);
        crc16(hashed.as_bytes()) % SLOTS
    }

    /// For each slot, the shortest decimal string that hashes to it (all found below 10^6).
    static TAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
        let mut tags = vec![String::new(); usize::from(SLOTS)];
        let mut missing = usize::from(SLOTS);
        let mut n: u64 = 0;
        while missing > 0 {
            let tag = n.to_string();
            let slot = usize::from(crc16(tag.as_bytes()) % SLOTS);
            if tags[slot].is_empty() {
                tags[slot] = tag;
                missing -= 1;
            }
            n += 1;
        }
        tags
    });

    /// A hash tag whose slot is `slot`.
    pub fn tag(slot: u16) -> &'static str {
        &TAGS[usize::from(slot % SLOTS)]
    }
}

/// Versions as fixed-width decimal text, so that Lua compares them exactly.
fn version_text(v: u64) -> String {
    format!("{v:020}")
}

fn parse_version(text: &str) -> Result<u64> {
    text.parse().map_err(|_| StoreError::Corrupt("version"))
}

fn token_hex(id: &TokenId) -> String {
    id.0.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_token_hex(text: &str) -> Result<TokenId> {
    let corrupt = || StoreError::Corrupt("token id");
    if text.len() != 32 {
        return Err(corrupt());
    }
    let mut id = [0u8; 16];
    for (i, out) in id.iter_mut().enumerate() {
        let pair = text.get(2 * i..2 * i + 2).ok_or_else(corrupt)?;
        *out = u8::from_str_radix(pair, 16).map_err(|_| corrupt())?;
    }
    Ok(TokenId(id))
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        StoreError::Io(format!("redis: {e}"))
    }
}

/// Compares two 20-digit versions exactly: each half of 10 digits is below 2^53.
const LUA_CMP: &str = r#"
local function cmp(a, b)
  local ah, bh = tonumber(string.sub(a, 1, 10)), tonumber(string.sub(b, 1, 10))
  if ah ~= bh then if ah < bh then return -1 else return 1 end end
  local al, bl = tonumber(string.sub(a, 11)), tonumber(string.sub(b, 11))
  if al ~= bl then if al < bl then return -1 else return 1 end end
  return 0
end
"#;

/// KEYS: tok, last, pend, expiry index. ARGV: appid, mode (`e` exact, `c` clock), version,
/// expires_ms, max server version, index member. The compare-and-set of a PUT. Returns
/// {'raised', version, had a pending event (0/1)} or {'superseded', last} or {'gone'} or
/// {'exhausted'}.
const LUA_PUT: &str = r#"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return {'gone'} end
local last = redis.call('HGET', KEYS[2], ARGV[1])
local v = ARGV[3]
if ARGV[2] == 'c' then
  if last and cmp(last, v) >= 0 then
    if cmp(last, ARGV[5]) >= 0 then return {'exhausted'} end
    v = string.format('%020.0f', tonumber(last) + 1)
  elseif cmp(v, ARGV[5]) > 0 then
    return {'exhausted'}
  end
end
if last and cmp(v, last) <= 0 then return {'superseded', last} end
local had = redis.call('HEXISTS', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], v)
redis.call('HSET', KEYS[3], ARGV[1], v .. ':' .. ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[6])
return {'raised', v, tostring(had)}
"#;

/// KEYS: pend, expiry index. ARGV: appid, version, index member. The compare-and-delete of an
/// ACK.
const LUA_ACK: &str = r#"
local val = redis.call('HGET', KEYS[1], ARGV[1])
if not val then return 0 end
if cmp(string.sub(val, 1, 20), ARGV[2]) == 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[3])
  return 1
end
return 0
"#;

/// KEYS: tok, kick. ARGV: appid, candidate token, max per UAID, kick, kick change (`set`,
/// `clear` or `keep`; see [`KickChange`]).
const LUA_REGISTER: &str = r#"
local t = redis.call('HGET', KEYS[1], ARGV[1])
if not t then
  if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return {'toomany'} end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
if ARGV[5] == 'set' then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
elseif ARGV[5] == 'clear' then
  redis.call('HDEL', KEYS[2], ARGV[1])
end
if t then return {'existing', t} end
return {'created', ARGV[2]}
"#;

/// KEYS: kick. ARGV: kick. Removes every registration's kick equal to ARGV[1]; returns how many.
const LUA_REMOVE_KICK: &str = r#"
local all = redis.call('HGETALL', KEYS[1])
local n = 0
for i = 1, #all, 2 do
  if all[i + 1] == ARGV[1] then
    redis.call('HDEL', KEYS[1], all[i])
    n = n + 1
  end
end
return n
"#;

/// KEYS: tok, last, kick, pend, expiry index. ARGV: appid, index member. Returns
/// {token, had a pending event (0/1)}, or false.
const LUA_UNREGISTER: &str = r#"
local t = redis.call('HGET', KEYS[1], ARGV[1])
if not t then return false end
local had = redis.call('HDEL', KEYS[4], ARGV[1])
for i = 1, 3 do redis.call('HDEL', KEYS[i], ARGV[1]) end
redis.call('ZREM', KEYS[5], ARGV[2])
return {t, tostring(had)}
"#;

/// KEYS: token, expiry index. ARGV: gone_until_ms, index member. Writes the tombstone.
const LUA_TOMBSTONE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(ARGV[1]) > now then
  redis.call('SET', KEYS[1], 'gone', 'PXAT', ARGV[1])
else
  redis.call('SET', KEYS[1], 'gone')
end
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
return 1
"#;

/// KEYS: pend, expiry index. ARGV: appid, now_ms, index member. Deletes the event if it has
/// expired (it may have been replaced by a later one since the index was read).
const LUA_EXPIRE_EVENT: &str = r#"
local val = redis.call('HGET', KEYS[1], ARGV[1])
if val then
  local sep = string.find(val, ':', 1, true)
  if sep and tonumber(string.sub(val, sep + 1)) > tonumber(ARGV[2]) then return 0 end
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('ZREM', KEYS[2], ARGV[3])
if val then return 1 end
return 0
"#;

/// KEYS: token, expiry index. ARGV: index member. Deletes an expired tombstone.
const LUA_EXPIRE_TOMBSTONE: &str = r#"
local removed = 0
if redis.call('GET', KEYS[1]) == 'gone' then
  removed = redis.call('DEL', KEYS[1])
end
redis.call('ZREM', KEYS[2], ARGV[1])
return removed
"#;

/// KEYS: binding, idle index. ARGV: now, index member (the UAID). Binds the UAID if it is not,
/// and indexes when it was seen. Returns 1 if it bound it.
const LUA_BIND: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
  return 1
end
return 0
"#;

/// KEYS: binding, idle index. ARGV: now, the touch interval, index member. Binds the UAID if it
/// is not; otherwise records it seen now if it was last seen an interval ago or more. Returns 1
/// if it bound it.
const LUA_TOUCH: &str = r#"
local seen = redis.call('GET', KEYS[1])
if seen and tonumber(ARGV[1]) - tonumber(seen) < tonumber(ARGV[2]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[3])
if seen then return 0 end
return 1
"#;

/// KEYS: binding, idle index. ARGV: idle-before time, index member. Drops the UAID from the idle
/// index (its registrations are gone) unless it was seen since (then the index gets that time).
/// Returns 1 if it dropped it.
const LUA_UNINDEX_IDLE: &str = r#"
local seen = redis.call('GET', KEYS[1])
if seen and tonumber(seen) >= tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[2], seen, ARGV[2])
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"#;

/// KEYS: server keys, keys id. ARGV: keys ('' for keys from config: none stored), their id.
/// Stores them unless keys are stored or another id is recorded (the first node on an empty
/// Redis; a node putting back what Redis lost); returns what is there then, so nodes starting
/// together all get the first one's keys.
const LUA_CREATE_KEYS: &str = r#"
local text = redis.call('GET', KEYS[1])
local id = redis.call('GET', KEYS[2])
if not text and (not id or id == ARGV[2]) then
  if ARGV[1] ~= '' then
    redis.call('SET', KEYS[1], ARGV[1])
    text = ARGV[1]
  end
  redis.call('SET', KEYS[2], ARGV[2])
  id = ARGV[2]
end
return {text, id}
"#;

/// KEYS: keys id. ARGV: an id. Records the id unless one is recorded; returns the recorded one.
const LUA_RECORD_KEYS_ID: &str = r#"
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"#;

/// KEYS: server keys, keys id, where to keep the replaced keys. ARGV: new keys ('' for keys
/// from config: none stored), their id. Returns 1 if it kept replaced keys.
const LUA_RESET_KEYS: &str = r#"
local old = redis.call('GET', KEYS[1])
if old then redis.call('SET', KEYS[3], old) end
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('SET', KEYS[2], ARGV[2])
if old then return 1 end
return 0
"#;

/// What a Redis holds about the server keys (see [`RedisStore::server_keys`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredKeys {
    /// `ed:server-keys`: generated keys in their `keys.toml` text form.
    pub text: Option<String>,
    /// `ed:keys-id:{ed:server-keys}`: the id of the keys the data was written with.
    pub id: Option<String>,
}

/// Index entries read per expiry index and round of a sweep.
const SWEEP_BATCH: usize = 512;
/// Expiry indexes read concurrently by a sweep (pipelined on one connection).
const SWEEP_PARALLEL: usize = 256;

/// The connection: one server through a reconnecting manager, or a cluster (which follows
/// slot moves and reconnects by itself). Clones share the underlying connection.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

/// Where Redis is and how long a call may take.
#[derive(Debug, Clone)]
pub struct RedisTarget {
    /// A single server, used when `cluster_urls` is empty.
    pub url: String,
    /// Seed nodes of a Redis Cluster.
    pub cluster_urls: Vec<String>,
    /// Bound on every call, connection attempts included.
    pub timeout: Duration,
}

impl RedisTarget {
    pub fn is_cluster(&self) -> bool {
        !self.cluster_urls.is_empty()
    }

    /// The server or cluster for messages, without passwords.
    pub fn shown(&self) -> String {
        if self.is_cluster() {
            let urls: Vec<String> = self
                .cluster_urls
                .iter()
                .map(|u| crate::config::redact_url(u))
                .collect();
            format!("the Redis Cluster at {}", urls.join(", "))
        } else {
            format!("the Redis at {}", crate::config::redact_url(&self.url))
        }
    }

    /// Opens a connection; with `push`, over RESP3 with pub/sub messages sent there (and, for a
    /// single server, subscriptions renewed after a reconnect; a cluster connection always does).
    pub async fn connect(&self, push: Option<impl AsyncPushSender>) -> Result<RedisConn> {
        let connect = async {
            if self.is_cluster() {
                let mut builder = ClusterClientBuilder::new(self.cluster_urls.clone())
                    .connection_timeout(self.timeout)
                    .response_timeout(self.timeout)
                    .retries(2);
                if let Some(push) = push {
                    builder = builder.use_protocol(ProtocolVersion::RESP3).push_sender(push);
                }
                let client = builder.build()?;
                Ok(RedisConn::Cluster(client.get_async_connection().await?))
            } else {
                let mut info = self.url.as_str().into_connection_info()?;
                let mut config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_secs(1));
                if let Some(push) = push {
                    let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
                    info = info.set_redis_settings(settings);
                    config = config.set_push_sender(push).set_automatic_resubscription();
                }
                let client = redis::Client::open(info)?;
                Ok(RedisConn::Single(
                    ConnectionManager::new_with_config(client, config).await?,
                ))
            }
        };
        tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| StoreError::Timeout)?
    }
}

/// The Redis-backed store. Clones share one connection and one pending-event gauge.
#[derive(Clone)]
pub struct RedisStore {
    conn: RedisConn,
    timeout: Duration,
    /// Cluster mode: one expiry index per hash slot instead of one in all.
    cluster: bool,
    scripts: Arc<Scripts>,
    gauge: Arc<Gauge>,
}

struct Scripts {
    put: Script,
    ack: Script,
    register: Script,
    remove_kick: Script,
    unregister: Script,
    tombstone: Script,
    expire_event: Script,
    expire_tombstone: Script,
    bind: Script,
    touch: Script,
    unindex_idle: Script,
}

/// The pending-event gauge: the shared counter as last read, plus this node's changes since.
#[derive(Default)]
struct Gauge {
    shared: AtomicI64,
    unflushed: AtomicI64,
}

impl RedisStore {
    /// Connects to the server or cluster; fails if it cannot be reached within the timeout.
    pub async fn open(target: &RedisTarget) -> Result<RedisStore> {
        let conn = target.connect(None::<NoPush>).await?;
        let with_cmp = |body: &str| Script::new(&format!("{LUA_CMP}{body}"));
        let store = RedisStore {
            conn,
            timeout: target.timeout,
            cluster: target.is_cluster(),
            scripts: Arc::new(Scripts {
                put: with_cmp(LUA_PUT),
                ack: with_cmp(LUA_ACK),
                register: Script::new(LUA_REGISTER),
                remove_kick: Script::new(LUA_REMOVE_KICK),
                unregister: Script::new(LUA_UNREGISTER),
                tombstone: Script::new(LUA_TOMBSTONE),
                expire_event: Script::new(LUA_EXPIRE_EVENT),
                expire_tombstone: Script::new(LUA_EXPIRE_TOMBSTONE),
                bind: Script::new(LUA_BIND),
                touch: Script::new(LUA_TOUCH),
                unindex_idle: Script::new(LUA_UNINDEX_IDLE),
            }),
            gauge: Arc::new(Gauge::default()),
        };
        store.flush_gauge().await?;
        Ok(store)
    }

    /// The expiry index that lives in the slot of `key`.
    fn index_for(&self, key: &str) -> String {
        key::expiry_index(self.cluster.then_some(key))
    }

    /// The idle index (UAID → last seen) that lives in the slot of `uaid`'s binding.
    fn idle_index_for(&self, uaid: &Uaid) -> String {
        key::idle_index(self.cluster.then_some(&key::bound(uaid)))
    }

    /// Expires one batch of one idle index; see [`Store::expire_idle`].
    async fn expire_idle_index(
        &self,
        index: &str,
        now_ms: u64,
        idle_before_ms: u64,
        gone_until_ms: u64,
        held: &(dyn Fn(&Uaid) -> bool + Sync),
    ) -> Result<u64> {
        let mut range = redis::cmd("ZRANGEBYSCORE");
        range
            .arg(index)
            .arg("-inf")
            .arg(format!("({idle_before_ms}"))
            .arg("LIMIT")
            .arg(0)
            .arg(SWEEP_BATCH);
        let members: Vec<String> = self.query(&range).await?;
        let mut expired = 0;
        for member in &members {
            let uaid = Uaid::parse(member).map_err(|_| StoreError::Corrupt("idle index member"))?;
            let mut exists = redis::cmd("EXISTS");
            exists.arg(key::route(&uaid));
            let routed: u64 = self.query(&exists).await?;
            if held(&uaid) || routed > 0 {
                // In use all along: seen now, so it gets a whole idle period after it is let go
                // (and leaves the stale end of the index, which a batch reads first).
                self.touch_uaid(uaid, now_ms).await?;
                continue;
            }
            // The binding stays (the UAID and its secret remain its owner's); its registrations
            // go, then its index entry, unless a touch came meanwhile. A failure midway leaves
            // the entry, so the next sweep goes on.
            let mut apps = redis::cmd("HKEYS");
            apps.arg(key::tokens(&uaid));
            let appids: Vec<String> = self.query(&apps).await?;
            for appid in &appids {
                let appid = Appid::parse(appid).map_err(|_| StoreError::Corrupt("registration appid"))?;
                self.unregister(uaid, appid, gone_until_ms).await?;
            }
            let mut conn = self.conn.clone();
            let _: u64 = bounded(
                self.timeout,
                self.scripts
                    .unindex_idle
                    .key(key::bound(&uaid))
                    .key(index)
                    .arg(idle_before_ms)
                    .arg(member)
                    .invoke_async(&mut conn),
            )
            .await?;
            if appids.is_empty() {
                continue;
            }
            expired += 1;
        }
        Ok(expired)
    }

    fn count_pending(&self, delta: i64) {
        self.gauge.unflushed.fetch_add(delta, Ordering::Relaxed);
    }

    /// Adds this node's unflushed changes to the shared counter and reads it back.
    async fn flush_gauge(&self) -> Result<()> {
        let delta = self.gauge.unflushed.swap(0, Ordering::Relaxed);
        let mut incr = redis::cmd("INCRBY");
        incr.arg(key::pending_count()).arg(delta);
        match self.query::<i64>(&incr).await {
            Ok(shared) => {
                self.gauge.shared.store(shared, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.gauge.unflushed.fetch_add(delta, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Expires what one index holds up to `now_ms`; returns (events, tombstones) deleted.
    async fn sweep_index(&self, index: &str, now_ms: u64) -> Result<(u64, u64)> {
        let (mut events, mut tombstones) = (0, 0);
        loop {
            let mut range = redis::cmd("ZRANGEBYSCORE");
            range
                .arg(index)
                .arg("-inf")
                .arg(now_ms)
                .arg("LIMIT")
                .arg(0)
                .arg(SWEEP_BATCH);
            let members: Vec<String> = self.query(&range).await?;
            for member in &members {
                let mut conn = self.conn.clone();
                if let Some(pair) = member.strip_prefix("e:") {
                    let parsed = pair
                        .split_once('/')
                        .and_then(|(u, a)| Some((Uaid::parse(u).ok()?, Appid::parse(a).ok()?)));
                    let Some((uaid, appid)) = parsed else {
                        return Err(StoreError::Corrupt("expiry index member"));
                    };
                    let n: u64 = bounded(
                        self.timeout,
                        self.scripts
                            .expire_event
                            .key(key::pending(&uaid))
                            .key(index)
                            .arg(appid.to_string())
                            .arg(now_ms)
                            .arg(member)
                            .invoke_async(&mut conn),
                    )
                    .await?;
                    if n > 0 {
                        self.count_pending(-1);
                    }
                    events += n;
                } else if let Some(hex) = member.strip_prefix("t:") {
                    let id = parse_token_hex(hex)?;
                    let n: u64 = bounded(
                        self.timeout,
                        self.scripts
                            .expire_tombstone
                            .key(key::token(&id))
                            .key(index)
                            .arg(member)
                            .invoke_async(&mut conn),
                    )
                    .await?;
                    tombstones += n;
                } else {
                    return Err(StoreError::Corrupt("expiry index member"));
                }
            }
            if members.len() < SWEEP_BATCH {
                return Ok((events, tombstones));
            }
        }
    }

    /// A handle on the connection, for routing.
    pub fn conn(&self) -> RedisConn {
        self.conn.clone()
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs one command with the time bound.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        let mut conn = self.conn.clone();
        bounded(self.timeout, cmd.query_async(&mut conn)).await
    }

    /// The stored server keys and the id of the keys the data was written with.
    pub async fn server_keys(&self) -> Result<StoredKeys> {
        let mut get = redis::cmd("MGET");
        get.arg(key::server_keys()).arg(key::keys_id());
        self.stored_keys(get).await
    }

    /// Stores `keys` (`None`: keys from config, only their id is recorded) and their `id`
    /// unless keys are stored or another id is recorded, atomically: of nodes starting together
    /// on an empty Redis, the first one's keys win. Returns what the Redis then has.
    pub async fn create_server_keys(&self, keys: Option<&str>, id: &str) -> Result<StoredKeys> {
        let mut eval = redis::cmd("EVAL");
        eval.arg(LUA_CREATE_KEYS)
            .arg(2)
            .arg(key::server_keys())
            .arg(key::keys_id())
            .arg(keys.unwrap_or(""))
            .arg(id);
        self.stored_keys(eval).await
    }

    /// Records `id` as the keys the data is written with unless an id is recorded; returns the
    /// recorded one.
    pub async fn record_keys_id(&self, id: &str) -> Result<String> {
        let mut eval = redis::cmd("EVAL");
        eval.arg(LUA_RECORD_KEYS_ID).arg(1).arg(key::keys_id()).arg(id);
        let recorded: Option<String> = self.query(&eval).await?;
        recorded.ok_or(StoreError::Corrupt("keys id vanished"))
    }

    /// `serve --reset-keys`: `generated` keys (`None`: keys from config, none stored) and their
    /// `id` replace what is stored. Returns where the replaced keys were kept, if there were any.
    pub async fn reset_server_keys(&self, generated: Option<&str>, id: &str) -> Result<Option<String>> {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let kept = key::replaced_keys(secs);
        let mut eval = redis::cmd("EVAL");
        eval.arg(LUA_RESET_KEYS)
            .arg(3)
            .arg(key::server_keys())
            .arg(key::keys_id())
            .arg(&kept)
            .arg(generated.unwrap_or(""))
            .arg(id);
        let replaced: u64 = self.query(&eval).await?;
        Ok((replaced == 1).then_some(kept))
    }

    async fn stored_keys(&self, cmd: Cmd) -> Result<StoredKeys> {
        let values: Vec<Option<String>> = self.query(&cmd).await?;
        let mut values = values.into_iter();
        Ok(StoredKeys {
            text: values.next().flatten(),
            id: values.next().flatten(),
        })
    }

    /// How many other nodes listen on this Redis (each subscribes to its nudge channel once it
    /// has its keys). Counted on a single server only: a cluster's sharded channels are per
    /// shard, and this answers 0 there.
    pub async fn live_nodes(&self) -> Result<usize> {
        if self.cluster {
            return Ok(0);
        }
        let mut channels = redis::cmd("PUBSUB");
        channels.arg("CHANNELS").arg(key::node_channel("*"));
        let found: Vec<String> = self.query(&channels).await?;
        Ok(found.len())
    }

    /// Whether this Redis holds edition data: a bound UAID (in the idle index) or a pending
    /// event or tombstone (in the expiry index). One call on a server; on a cluster one per
    /// index, as a sweep reads them.
    pub async fn holds_data(&self) -> Result<bool> {
        let indexes: Vec<String> = if self.cluster {
            (0..slot::SLOTS)
                .flat_map(|s| [key::idle_index_of_slot(s), key::expiry_index_of_slot(s)])
                .collect()
        } else {
            vec![key::idle_index(None), key::expiry_index(None)]
        };
        if !self.cluster {
            let mut exists = redis::cmd("EXISTS");
            exists.arg(&indexes);
            let n: u64 = self.query(&exists).await?;
            return Ok(n > 0);
        }
        for batch in indexes.chunks(SWEEP_PARALLEL) {
            let checks = batch.iter().map(|index| {
                let mut exists = redis::cmd("EXISTS");
                exists.arg(index);
                async move { self.query::<u64>(&exists).await }
            });
            for found in futures_util::future::join_all(checks).await {
                if found? > 0 {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// The same for the KICK drivers' secrets (`crate::kick::KickKeys`).
    pub async fn load_or_create_kick_keys(&self, generated: &str) -> Result<String> {
        self.load_or_create(key::kick_keys(), generated).await
    }

    async fn load_or_create(&self, name: &str, generated: &str) -> Result<String> {
        let mut set = redis::cmd("SET");
        set.arg(name).arg(generated).arg("NX");
        let _: Option<String> = self.query(&set).await?;
        let mut get = redis::cmd("GET");
        get.arg(name);
        let text: Option<String> = self.query(&get).await?;
        text.ok_or(StoreError::Corrupt("server keys vanished"))
    }
}

/// Awaits a Redis call for at most `limit`.
pub async fn bounded<T>(
    limit: Duration,
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(StoreError::Timeout),
    }
}

/// No push messages (the command connection); a type to name in `connect(None)`.
pub struct NoPush;

impl AsyncPushSender for NoPush {
    fn send(&self, _: redis::PushInfo) -> std::result::Result<(), redis::aio::SendError> {
        Ok(())
    }
}

/// A script reply: a status word and maybe one value.
fn reply_parts(value: Vec<String>) -> (String, Option<String>) {
    let mut it = value.into_iter();
    (it.next().unwrap_or_default(), it.next())
}

impl Store for RedisStore {
    async fn bind_uaid(&self, uaid: Uaid) -> Result<bool> {
        let mut conn = self.conn.clone();
        let bound: u64 = bounded(
            self.timeout,
            self.scripts
                .bind
                .key(key::bound(&uaid))
                .key(self.idle_index_for(&uaid))
                .arg(super::now_ms())
                .arg(uaid.to_string())
                .invoke_async(&mut conn),
        )
        .await?;
        Ok(bound == 1)
    }

    async fn touch_uaid(&self, uaid: Uaid, now_ms: u64) -> Result<bool> {
        let mut conn = self.conn.clone();
        let bound: u64 = bounded(
            self.timeout,
            self.scripts
                .touch
                .key(key::bound(&uaid))
                .key(self.idle_index_for(&uaid))
                .arg(now_ms)
                .arg(super::TOUCH_EVERY_MS)
                .arg(uaid.to_string())
                .invoke_async(&mut conn),
        )
        .await?;
        Ok(bound == 1)
    }

    async fn expire_idle(
        &self,
        now_ms: u64,
        idle_before_ms: u64,
        gone_until_ms: u64,
        held: &(dyn Fn(&Uaid) -> bool + Sync),
    ) -> Result<u64> {
        let indexes: Vec<String> = if self.cluster {
            (0..slot::SLOTS).map(key::idle_index_of_slot).collect()
        } else {
            vec![key::idle_index(None)]
        };
        let mut expired = 0;
        for batch in indexes.chunks(SWEEP_PARALLEL) {
            let runs = batch
                .iter()
                .map(|index| self.expire_idle_index(index, now_ms, idle_before_ms, gone_until_ms, held));
            for result in futures_util::future::join_all(runs).await {
                expired += result?;
            }
        }
        Ok(expired)
    }

    async fn uaid_bound(&self, uaid: Uaid) -> Result<bool> {
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(key::bound(&uaid));
        let n: u64 = self.query(&cmd).await?;
        Ok(n > 0)
    }

    async fn register(
        &self,
        uaid: Uaid,
        appid: Appid,
        candidate: TokenId,
        kick: KickChange<'_>,
        max_per_uaid: usize,
    ) -> Result<Registered> {
        let (kick, change): (&[u8], &str) = match kick {
            KickChange::Set(bytes) => (bytes, "set"),
            KickChange::Clear => (&[], "clear"),
            KickChange::Keep => (&[], "keep"),
        };
        // The token index first: if we stop before the registration exists, it names a token
        // that nobody was given.
        let mut set = redis::cmd("SET");
        set.arg(key::token(&candidate))
            .arg(format!("{uaid}/{appid}"))
            .arg("NX");
        let fresh: Option<String> = self.query(&set).await?;
        if fresh.is_none() {
            // 128 random bits collided: astronomically unlikely, but never overwrite.
            return Err(StoreError::Corrupt("token id collision"));
        }
        let mut conn = self.conn.clone();
        let reply: Vec<String> = bounded(
            self.timeout,
            self.scripts
                .register
                .key(key::tokens(&uaid))
                .key(key::kick(&uaid))
                .arg(appid.to_string())
                .arg(token_hex(&candidate))
                .arg(max_per_uaid)
                .arg(kick)
                .arg(change)
                .invoke_async(&mut conn),
        )
        .await?;
        let (status, token) = reply_parts(reply);
        let outcome = match (status.as_str(), token) {
            ("created", _) => return Ok(Registered::Token(candidate)),
            ("existing", Some(t)) => Registered::Token(parse_token_hex(&t)?),
            ("toomany", _) => Registered::TooMany,
            _ => return Err(StoreError::Corrupt("register reply")),
        };
        let mut del = redis::cmd("DEL");
        del.arg(key::token(&candidate));
        let _: u64 = self.query(&del).await?;
        Ok(outcome)
    }

    async fn kick(&self, uaid: Uaid, appid: Appid) -> Result<Option<Vec<u8>>> {
        let mut hget = redis::cmd("HGET");
        hget.arg(key::kick(&uaid)).arg(appid.to_string());
        self.query(&hget).await
    }

    async fn kicks(&self, uaid: Uaid) -> Result<Vec<(Appid, Vec<u8>)>> {
        let mut hgetall = redis::cmd("HGETALL");
        hgetall.arg(key::kick(&uaid));
        let all: Vec<(String, Vec<u8>)> = self.query(&hgetall).await?;
        let mut out = all
            .into_iter()
            .map(|(appid, kick)| {
                Ok((
                    Appid::parse(&appid).map_err(|_| StoreError::Corrupt("kick appid"))?,
                    kick,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        out.sort_unstable_by_key(|(a, _)| *a);
        Ok(out)
    }

    async fn remove_kick(&self, uaid: Uaid, kick: &[u8]) -> Result<u64> {
        if kick.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn.clone();
        bounded(
            self.timeout,
            self.scripts
                .remove_kick
                .key(key::kick(&uaid))
                .arg(kick)
                .invoke_async(&mut conn),
        )
        .await
    }

    async fn unregister(&self, uaid: Uaid, appid: Appid, gone_until_ms: u64) -> Result<bool> {
        let mut conn = self.conn.clone();
        let reply: Option<(String, String)> = bounded(
            self.timeout,
            self.scripts
                .unregister
                .key(key::tokens(&uaid))
                .key(key::last(&uaid))
                .key(key::kick(&uaid))
                .key(key::pending(&uaid))
                .key(self.index_for(&key::pending(&uaid)))
                .arg(appid.to_string())
                .arg(key::event_member(&uaid, &appid))
                .invoke_async(&mut conn),
        )
        .await?;
        let Some((token, had)) = reply else {
            return Ok(false);
        };
        if had == "1" {
            self.count_pending(-1);
        }
        // Second step, in the token's slot. If we stop before it, the token still names the
        // registration, which no longer exists: a PUT answers Gone all the same.
        let id = parse_token_hex(&token)?;
        let token_key = key::token(&id);
        let _: i64 = bounded(
            self.timeout,
            self.scripts
                .tombstone
                .key(&token_key)
                .key(self.index_for(&token_key))
                .arg(gone_until_ms)
                .arg(key::tombstone_member(&id))
                .invoke_async(&mut conn),
        )
        .await?;
        Ok(true)
    }

    async fn lookup_token(&self, id: TokenId) -> Result<TokenTarget> {
        let mut get = redis::cmd("GET");
        get.arg(key::token(&id));
        let value: Option<String> = self.query(&get).await?;
        let Some(value) = value else {
            return Ok(TokenTarget::Unknown);
        };
        if value == "gone" {
            return Ok(TokenTarget::Gone);
        }
        let corrupt = || StoreError::Corrupt("token entry");
        let (u, a) = value.split_once('/').ok_or_else(corrupt)?;
        let uaid = Uaid::parse(u).map_err(|_| corrupt())?;
        let appid = Appid::parse(a).map_err(|_| corrupt())?;
        Ok(TokenTarget::Active(uaid, appid))
    }

    async fn put_version(
        &self,
        uaid: Uaid,
        appid: Appid,
        version: VersionReq,
        expires_at_ms: u64,
    ) -> Result<PutOutcome> {
        let (mode, v) = match version {
            VersionReq::Exact(v) => ("e", v),
            VersionReq::Clock(now) => ("c", now),
        };
        let mut conn = self.conn.clone();
        let reply: Vec<String> = bounded(
            self.timeout,
            self.scripts
                .put
                .key(key::tokens(&uaid))
                .key(key::last(&uaid))
                .key(key::pending(&uaid))
                .key(self.index_for(&key::pending(&uaid)))
                .arg(appid.to_string())
                .arg(mode)
                .arg(version_text(v))
                .arg(expires_at_ms)
                .arg(version_text(MAX_SERVER_VERSION))
                .arg(key::event_member(&uaid, &appid))
                .invoke_async(&mut conn),
        )
        .await?;
        match reply.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
            ["gone"] => Ok(PutOutcome::Gone),
            ["exhausted"] => Ok(PutOutcome::Exhausted),
            ["superseded", last] => Ok(PutOutcome::Superseded(parse_version(last)?)),
            ["raised", v, had] => {
                if *had == "0" {
                    self.count_pending(1);
                }
                Ok(PutOutcome::Raised(parse_version(v)?))
            }
            _ => Err(StoreError::Corrupt("put reply")),
        }
    }

    async fn pending(&self, uaid: Uaid, now_ms: u64) -> Result<Vec<(Appid, u64)>> {
        let mut hgetall = redis::cmd("HGETALL");
        hgetall.arg(key::pending(&uaid));
        let all: Vec<(String, String)> = self.query(&hgetall).await?;
        let corrupt = || StoreError::Corrupt("pending event");
        let mut out = Vec::with_capacity(all.len());
        for (appid, value) in all {
            let (version, expires) = value.split_once(':').ok_or_else(corrupt)?;
            let expires: u64 = expires.parse().map_err(|_| corrupt())?;
            if expires > now_ms {
                let appid = Appid::parse(&appid).map_err(|_| corrupt())?;
                out.push((appid, parse_version(version)?));
            }
        }
        out.sort_unstable_by_key(|(a, _)| *a);
        Ok(out)
    }

    async fn ack(&self, uaid: Uaid, appid: Appid, version: u64) -> Result<bool> {
        let mut conn = self.conn.clone();
        let cleared: u64 = bounded(
            self.timeout,
            self.scripts
                .ack
                .key(key::pending(&uaid))
                .key(self.index_for(&key::pending(&uaid)))
                .arg(appid.to_string())
                .arg(version_text(version))
                .arg(key::event_member(&uaid, &appid))
                .invoke_async(&mut conn),
        )
        .await?;
        if cleared == 1 {
            self.count_pending(-1);
        }
        Ok(cleared == 1)
    }

    fn request_commit(&self) -> CommitTicket {
        // Each write above was acknowledged by the primary; see the module documentation.
        CommitTicket(0)
    }

    async fn committed(&self, _ticket: CommitTicket) -> Result<()> {
        Ok(())
    }

    async fn sweep(&self, now_ms: u64) -> Result<SweepStats> {
        let indexes: Vec<String> = if self.cluster {
            (0..slot::SLOTS).map(key::expiry_index_of_slot).collect()
        } else {
            vec![key::expiry_index(None)]
        };
        let mut stats = SweepStats::default();
        for batch in indexes.chunks(SWEEP_PARALLEL) {
            let swept = batch.iter().map(|index| self.sweep_index(index, now_ms));
            for result in futures_util::future::join_all(swept).await {
                let (events, tombstones) = result?;
                stats.expired_events += events;
                stats.expired_tombstones += tombstones;
            }
        }
        self.flush_gauge().await?;
        Ok(stats)
    }

    fn pending_count(&self) -> u64 {
        let shared = self.gauge.shared.load(Ordering::Relaxed);
        let unflushed = self.gauge.unflushed.load(Ordering::Relaxed);
        shared.saturating_add(unflushed).max(0) as u64
    }

    async fn health(&self) -> Result<()> {
        // One PING within `redis_timeout_ms`; on a cluster the client sends it to every primary
        // and succeeds only if all answer.
        let _: redis::Value = self.query(&redis::cmd("PING")).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_uaid_share_a_hash_tag() {
        let u = Uaid::random();
        let tag = format!("{{{u}}}");
        for k in [
            key::bound(&u),
            key::tokens(&u),
            key::last(&u),
            key::kick(&u),
            key::pending(&u),
            key::route(&u),
        ] {
            assert!(k.contains(&tag), "{k}");
        }
        assert!(key::node_channel("n1").contains("{n1}"));
    }

    #[test]
    fn slots_match_redis_and_every_slot_has_a_tag() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(slot::of("foo"), 12182);
        assert_eq!(slot::of("{user1000}.following"), slot::of("{user1000}.followers"));
        assert_eq!(slot::of("foo{}{bar}"), slot::of("foo{}{bar}"));
        for s in [0, 1, 5000, 16383] {
            assert_eq!(slot::of(&key::expiry_index_of_slot(s)), s);
        }
        let u = Uaid::random();
        let index = key::expiry_index(Some(&key::pending(&u)));
        assert_eq!(slot::of(&index), slot::of(&key::pending(&u)));
        let id = TokenId::random();
        assert_eq!(
            slot::of(&key::expiry_index(Some(&key::token(&id)))),
            slot::of(&key::token(&id))
        );
    }

    #[test]
    fn versions_and_tokens_round_trip_as_text() {
        assert_eq!(version_text(u64::MAX), "18446744073709551615");
        assert_eq!(version_text(7).len(), 20);
        assert_eq!(parse_version(&version_text(u64::MAX)).unwrap(), u64::MAX);
        let id = TokenId::random();
        assert_eq!(parse_token_hex(&token_hex(&id)).unwrap(), id);
        assert_eq!(key::token(&id), format!("ed:tok:{}", token_hex(&id)));
        assert!(parse_token_hex("zz").is_err());
    }
}
