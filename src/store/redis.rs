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
//! * `ed:{u}:pend` — hash APPID → `version:expires_ms`; the key's own expiry is the latest of its
//!   events', so a UAID whose events all expired costs nothing. An expired event inside a live
//!   hash is invisible to reads and deleted by the read that finds it.
//! * `ed:tok:<hex>` — string per token: `uaid/appid`, or `gone` with a Redis expiry (the tombstone).
//! * `ed:{u}:route` — which node holds the UAID (see `crate::route`).
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
//! Expiry: tombstones and fully expired pending hashes use Redis expiry, so [`Store::sweep`] has
//! nothing to do; `pending_count` is not tracked (it would be a cross-slot counter on every PUT)
//! and reports 0.
//!
//! Every call has a bounded time (`store.redis_timeout_ms`), and the connection reconnects by
//! itself, so an outage turns into errors (503 on PUT) and then heals without a restart.

use std::time::Duration;

use redis::aio::{AsyncPushSender, ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, Pipeline, ProtocolVersion, RedisFuture, Script, Value};

use super::MAX_SERVER_VERSION;
use super::{PutOutcome, Registered, Result, Store, StoreError, SweepStats, TokenTarget, VersionReq};
use crate::ids::{Appid, Uaid};
use crate::keys::TokenId;

/// Key and channel names: one function per shape, nothing else formats a key.
pub mod key {
    use crate::ids::Uaid;
    use crate::keys::TokenId;

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
    /// The endpoint and secret keys shared by every node (when config names none).
    pub fn server_keys() -> &'static str {
        "ed:server-keys"
    }
    /// A node's nudge channel; the node id is a hash tag so sharded pub/sub maps it to one slot.
    pub fn node_channel(node: &str) -> String {
        format!("ed:node:{{{node}}}")
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

/// KEYS: tok, last, pend. ARGV: appid, mode (`e` exact, `c` clock), version, expires_ms,
/// max server version. The compare-and-set of a PUT.
const LUA_PUT: &str = r#"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return {'gone'} end
local last = redis.call('HGET', KEYS[2], ARGV[1])
local v = ARGV[3]
if ARGV[2] == 'c' and last and cmp(last, v) >= 0 then
  if cmp(last, ARGV[5]) >= 0 then return {'exhausted'} end
  v = string.format('%020.0f', tonumber(last) + 1)
end
if last and cmp(v, last) <= 0 then return {'superseded', last} end
redis.call('HSET', KEYS[2], ARGV[1], v)
redis.call('HSET', KEYS[3], ARGV[1], v .. ':' .. ARGV[4])
if redis.call('PEXPIRETIME', KEYS[3]) < tonumber(ARGV[4]) then
  redis.call('PEXPIREAT', KEYS[3], ARGV[4])
end
return {'raised', v}
"#;

/// KEYS: pend. ARGV: now_ms. Returns [appid, version, …] of live events; deletes expired ones.
const LUA_PENDING: &str = r#"
local all = redis.call('HGETALL', KEYS[1])
local now = tonumber(ARGV[1])
local out = {}
for i = 1, #all, 2 do
  local val = all[i + 1]
  local sep = string.find(val, ':', 1, true)
  if sep == nil or tonumber(string.sub(val, sep + 1)) <= now then
    redis.call('HDEL', KEYS[1], all[i])
  else
    out[#out + 1] = all[i]
    out[#out + 1] = string.sub(val, 1, sep - 1)
  end
end
return out
"#;

/// KEYS: pend. ARGV: appid, version. The compare-and-delete of an ACK.
const LUA_ACK: &str = r#"
local val = redis.call('HGET', KEYS[1], ARGV[1])
if not val then return 0 end
if cmp(string.sub(val, 1, 20), ARGV[2]) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
"#;

/// KEYS: tok, kick. ARGV: appid, candidate token, max per UAID, kick.
const LUA_REGISTER: &str = r#"
local t = redis.call('HGET', KEYS[1], ARGV[1])
if t then return {'existing', t} end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return {'toomany'} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], ARGV[1], ARGV[4]) end
return {'created', ARGV[2]}
"#;

/// KEYS: tok, last, kick, pend. ARGV: appid. Returns the token, or false.
const LUA_UNREGISTER: &str = r#"
local t = redis.call('HGET', KEYS[1], ARGV[1])
if not t then return false end
for i = 1, 4 do redis.call('HDEL', KEYS[i], ARGV[1]) end
return t
"#;

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

/// The Redis-backed store. Clones share one connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: RedisConn,
    timeout: Duration,
    scripts: std::sync::Arc<Scripts>,
}

struct Scripts {
    put: Script,
    pending: Script,
    ack: Script,
    register: Script,
    unregister: Script,
}

impl RedisStore {
    /// Connects to the server or cluster; fails if it cannot be reached within the timeout.
    pub async fn open(target: &RedisTarget) -> Result<RedisStore> {
        let conn = target.connect(None::<NoPush>).await?;
        let with_cmp = |body: &str| Script::new(&format!("{LUA_CMP}{body}"));
        Ok(RedisStore {
            conn,
            timeout: target.timeout,
            scripts: std::sync::Arc::new(Scripts {
                put: with_cmp(LUA_PUT),
                pending: Script::new(LUA_PENDING),
                ack: with_cmp(LUA_ACK),
                register: Script::new(LUA_REGISTER),
                unregister: Script::new(LUA_UNREGISTER),
            }),
        })
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

    /// Reads the shared server keys, creating them first (SET NX) if no node has yet.
    pub async fn load_or_create_keys(&self, generated: &str) -> Result<String> {
        let mut set = redis::cmd("SET");
        set.arg(key::server_keys()).arg(generated).arg("NX");
        let _: Option<String> = self.query(&set).await?;
        let mut get = redis::cmd("GET");
        get.arg(key::server_keys());
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
        let mut cmd = redis::cmd("SET");
        cmd.arg(key::bound(&uaid)).arg(super::now_ms()).arg("NX");
        let set: Option<String> = self.query(&cmd).await?;
        Ok(set.is_some())
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
        kick: &[u8],
        max_per_uaid: usize,
    ) -> Result<Registered> {
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

    async fn unregister(&self, uaid: Uaid, appid: Appid, gone_until_ms: u64) -> Result<bool> {
        let mut conn = self.conn.clone();
        let token: Option<String> = bounded(
            self.timeout,
            self.scripts
                .unregister
                .key(key::tokens(&uaid))
                .key(key::last(&uaid))
                .key(key::kick(&uaid))
                .key(key::pending(&uaid))
                .arg(appid.to_string())
                .invoke_async(&mut conn),
        )
        .await?;
        let Some(token) = token else { return Ok(false) };
        let id = parse_token_hex(&token)?;
        // The tombstone expires by itself; one already past its time is simply removed.
        let cmd = if gone_until_ms > super::now_ms() {
            let mut set = redis::cmd("SET");
            set.arg(key::token(&id))
                .arg("gone")
                .arg("PXAT")
                .arg(gone_until_ms);
            set
        } else {
            let mut del = redis::cmd("DEL");
            del.arg(key::token(&id));
            del
        };
        let _: Value = self.query(&cmd).await?;
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
                .arg(appid.to_string())
                .arg(mode)
                .arg(version_text(v))
                .arg(expires_at_ms)
                .arg(version_text(MAX_SERVER_VERSION))
                .invoke_async(&mut conn),
        )
        .await?;
        match reply_parts(reply) {
            (s, _) if s == "gone" => Ok(PutOutcome::Gone),
            (s, _) if s == "exhausted" => Ok(PutOutcome::Exhausted),
            (s, Some(last)) if s == "superseded" => Ok(PutOutcome::Superseded(parse_version(&last)?)),
            (s, Some(v)) if s == "raised" => Ok(PutOutcome::Raised(parse_version(&v)?)),
            _ => Err(StoreError::Corrupt("put reply")),
        }
    }

    async fn pending(&self, uaid: Uaid, now_ms: u64) -> Result<Vec<(Appid, u64)>> {
        let mut conn = self.conn.clone();
        let flat: Vec<String> = bounded(
            self.timeout,
            self.scripts
                .pending
                .key(key::pending(&uaid))
                .arg(now_ms)
                .invoke_async(&mut conn),
        )
        .await?;
        let mut out = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks(2) {
            let [appid, version] = pair else {
                return Err(StoreError::Corrupt("pending reply"));
            };
            let appid = Appid::parse(appid).map_err(|_| StoreError::Corrupt("pending appid"))?;
            out.push((appid, parse_version(version)?));
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
                .arg(appid.to_string())
                .arg(version_text(version))
                .invoke_async(&mut conn),
        )
        .await?;
        Ok(cleared == 1)
    }

    async fn sync(&self) -> Result<()> {
        // Each write above was acknowledged by the primary; see the module documentation.
        Ok(())
    }

    async fn sweep(&self, _now_ms: u64) -> Result<SweepStats> {
        // Tombstones and fully expired pending hashes expire in Redis; see the module docs.
        Ok(SweepStats::default())
    }

    fn pending_count(&self) -> u64 {
        0
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
