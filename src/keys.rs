//! Endpoint tokens and UAID secrets.
//!
//! * A UAID's secret is `HMAC-SHA256(secret_key, uaid)`: every node that shares the key can check
//!   it without a store read, and it is issued only by the store's atomic "bind on first use".
//! * An endpoint token is a random 16-byte id (the store maps it to UAID/APPID, so the token reveals
//!   neither) followed by a 16-byte HMAC tag over the id: a forged or tampered token is rejected
//!   without touching the store.
//!
//! Keys come from config or are generated once and kept in `<data_dir>/keys.toml` (mode 0600);
//! with the Redis store they are kept in Redis instead (created once, atomically), so every node
//! sharing that Redis accepts every endpoint and secret any of them issued. Either way the store
//! records which keys its data was written with (a digest, [`Keys::id`]): keys lost or changed
//! while data remains refuse to start unless `serve --reset-keys`.
//! They never appear in logs: nothing here implements `Debug` with the key bytes.

use std::io::Write as _;
use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::KeysConfig;
use crate::ids::{TokenId, Uaid};
use crate::store::{RedisStore, StoreError, StoredKeys};

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("keys.{0} must be 32 bytes in base64url")]
    BadKey(&'static str),
    #[error("key file {path}: {source}")]
    File { path: String, source: std::io::Error },
    #[error("key file {0} is corrupt")]
    Corrupt(String),
    #[error(
        "{path} is missing, but the store in {store} holds data written with the keys it held, and \
         [keys] endpoint_key and secret_key are not set. New keys would reject every endpoint and \
         UAID secret issued so far. Restore {path} from a backup (or set both keys to the values it \
         held), or start with --reset-keys to generate new keys (every client must then register \
         again)"
    )]
    Missing { path: String, store: String },
    #[error(
        "the keys from {from} are not the keys the store in {store} was written with (key id \
         {id}; the store's is {recorded}, recorded in keys.id beside keys.toml): they would reject \
         every endpoint and UAID secret issued so far. Use the keys the store was written with, \
         or start with --reset-keys to keep these (every client must then register again)"
    )]
    Mismatch {
        from: String,
        store: String,
        id: String,
        recorded: String,
    },
    #[error(
        "{redis} has no server keys (key ed:server-keys), but {found}, and [keys] endpoint_key \
         and secret_key are not set. New keys would reject every endpoint and UAID secret issued \
         so far. Restore ed:server-keys (from a backup of this Redis, or set both [keys] to the \
         values it held), or start one node with --reset-keys to generate new keys (every client \
         must then register again; stop every other node on this Redis first, and start them \
         without it)"
    )]
    MissingInRedis { redis: String, found: String },
    #[error(
        "the keys from {from} are not the keys {redis} was written with (key id {id}; its \
         data's is {recorded}, recorded in the key ed:keys-id:{{ed:server-keys}}): they would \
         reject every endpoint and UAID secret issued so far. Use the keys the data was written \
         with, or start one node with --reset-keys to keep these (every client must then \
         register again; stop every other node on this Redis first)"
    )]
    MismatchInRedis {
        from: String,
        redis: String,
        id: String,
        recorded: String,
    },
    #[error("{redis}: {source}")]
    Redis { redis: String, source: StoreError },
}

/// The two server keys.
pub struct Keys {
    endpoint: HmacSha256,
    secret: HmacSha256,
    /// Generated keys kept in Redis: their stored text, which [`Keys::keep_shared`] puts back
    /// if Redis loses it.
    shared: Option<String>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys { .. }")
    }
}

const TAG_LEN: usize = 16;

fn fill_random(buf: &mut [u8]) {
    // The OS generator failing means the machine cannot do cryptography at all.
    getrandom::fill(buf).expect("operating system random number generator failed");
}

fn decode_key(name: &'static str, text: &str) -> Result<[u8; 32], KeyError> {
    B64.decode(text.trim())
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or(KeyError::BadKey(name))
}

impl Keys {
    pub fn from_bytes(endpoint: &[u8; 32], secret: &[u8; 32]) -> Keys {
        Keys {
            endpoint: HmacSha256::new_from_slice(endpoint).expect("HMAC takes any key length"),
            secret: HmacSha256::new_from_slice(secret).expect("HMAC takes any key length"),
            shared: None,
        }
    }

    /// Keys named in config, or `None` when config names none (both empty).
    pub fn from_config(config: &KeysConfig) -> Result<Option<Keys>, KeyError> {
        if config.endpoint_key.is_empty() && config.secret_key.is_empty() {
            return Ok(None);
        }
        let e = decode_key("endpoint_key", &config.endpoint_key)?;
        let s = decode_key("secret_key", &config.secret_key)?;
        Ok(Some(Keys::from_bytes(&e, &s)))
    }

    /// Fresh random keys in the `keys.toml` text form (what is stored, in a file or in Redis).
    pub fn generate_text() -> String {
        let (mut e, mut s) = ([0u8; 32], [0u8; 32]);
        fill_random(&mut e);
        fill_random(&mut s);
        format!(
            "# Generated by editiond on first start. Losing this file invalidates every\n\
             # endpoint and UAID secret issued so far. Keep it private.\n\
             endpoint_key = \"{}\"\nsecret_key = \"{}\"\n",
            B64.encode(e),
            B64.encode(s)
        )
    }

    /// Keys from their `keys.toml` text form; `origin` names where it came from in errors.
    pub fn from_text(text: &str, origin: &str) -> Result<Keys, KeyError> {
        let corrupt = || KeyError::Corrupt(origin.to_owned());
        let table: toml::Table = text.parse().map_err(|_| corrupt())?;
        let get = |k: &str| table.get(k).and_then(|v| v.as_str()).ok_or_else(corrupt);
        let e = decode_key("endpoint_key", get("endpoint_key")?).map_err(|_| corrupt())?;
        let s = decode_key("secret_key", get("secret_key")?).map_err(|_| corrupt())?;
        Ok(Keys::from_bytes(&e, &s))
    }

    /// Keys from config when given there, else from `<dir>/keys.toml`, created on first start.
    ///
    /// `store` is the store these keys serve. When it exists it holds data written with some
    /// keys: a missing `keys.toml` is then an error rather than a reason to make new keys, and
    /// keys that are not the ones it was written with (a changed `[keys]`, another instance's
    /// file) are refused; `<dir>/keys.id` records which keys those are (a digest of each, not
    /// the keys). `reset` (`--reset-keys`) starts over: new keys (unless `[keys]` sets them), the
    /// old file kept as `keys.toml.replaced-<unix seconds>`, and the store's record renewed.
    pub fn load_for(
        config: &KeysConfig,
        dir: &Path,
        store: Option<&Path>,
        reset: bool,
    ) -> Result<Keys, KeyError> {
        let (keys, source) = Keys::load_file(config, dir, store, reset)?;
        let Some(store) = store else {
            return Ok(keys);
        };
        let id_path = dir.join("keys.id");
        let id = keys.id();
        let recorded = match std::fs::read_to_string(&id_path) {
            Ok(text) => Some(text.trim().to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(KeyError::File {
                    path: id_path.display().to_string(),
                    source,
                })
            }
        };
        match recorded {
            Some(recorded) if recorded == id => Ok(keys),
            // Data written before this record existed cannot be checked: record it now.
            Some(recorded) if store.exists() && !reset => Err(KeyError::Mismatch {
                from: source,
                store: store.display().to_string(),
                id,
                recorded,
            }),
            _ => {
                write_private(&id_path, format!("{id}\n").as_bytes()).map_err(|source| KeyError::File {
                    path: id_path.display().to_string(),
                    source,
                })?;
                Ok(keys)
            }
        }
    }

    /// The keys of the nodes sharing the Redis `store` (`redis` names it in errors): from config
    /// when given there, else the generated ones in `ed:server-keys`, which the first node on an
    /// empty Redis creates (in one script, so nodes starting together agree on one set).
    ///
    /// Like [`Keys::load_for`] on sled, the Redis records which keys its data was written with
    /// (`ed:keys-id:{ed:server-keys}`, a digest): keys other than those are refused, and so are
    /// missing keys when that record, a bound UAID or a pending event shows that this Redis had
    /// keys (a deleted `ed:server-keys`; a Redis restarted without persistence into which other
    /// nodes, still holding the old keys, write again). Only a Redis with none of these gets new
    /// keys. `reset` (`--reset-keys`) starts over: new keys (unless `[keys]` sets them), the old
    /// ones kept in `ed:server-keys-replaced-<unix seconds>:{ed:server-keys}`, the record renewed.
    pub async fn load_shared(
        config: &KeysConfig,
        store: &RedisStore,
        redis: &str,
        reset: bool,
    ) -> Result<Keys, KeyError> {
        const ORIGIN: &str = "redis key ed:server-keys";
        let redis_err = |source| KeyError::Redis {
            redis: redis.to_owned(),
            source,
        };
        let configured = Keys::from_config(config)?;
        if reset {
            let (keys, text) = match configured {
                Some(keys) => (keys, None),
                None => {
                    let text = Keys::generate_text();
                    (Keys::from_text(&text, ORIGIN)?, Some(text))
                }
            };
            let kept = store
                .reset_server_keys(text.as_deref(), &keys.id())
                .await
                .map_err(redis_err)?;
            tracing::warn!(
                old = kept.as_deref().unwrap_or("(none)"),
                "--reset-keys: new keys; every endpoint and UAID secret issued so far is void"
            );
            let mut keys = keys;
            keys.shared = text;
            return Ok(keys);
        }
        let mut stored = store.server_keys().await.map_err(redis_err)?;
        let (keys, from) = match (configured, &stored.text) {
            (Some(keys), _) => (keys, "[keys] endpoint_key and secret_key"),
            (None, Some(text)) => (Keys::from_text(text, ORIGIN)?, ORIGIN),
            (None, None) => {
                let mut found = None;
                if stored.id.is_none() {
                    let live = store.live_nodes().await.map_err(redis_err)?;
                    found = if live > 0 {
                        Some(format!(
                            "{live} other editiond node(s) listen on it: they hold the keys and \
                             put them back within store.keys_check_secs (start this node again \
                             then)"
                        ))
                    } else if store.holds_data().await.map_err(redis_err)? {
                        Some("it holds bound UAIDs or pending events written with keys".to_owned())
                    } else {
                        None
                    };
                    stored = match found {
                        // Unless a node racing this one made keys, or a running node put its back.
                        Some(_) => store.server_keys().await.map_err(redis_err)?,
                        None => {
                            let text = Keys::generate_text();
                            let id = Keys::from_text(&text, ORIGIN)?.id();
                            store
                                .create_server_keys(Some(&text), &id)
                                .await
                                .map_err(redis_err)?
                        }
                    };
                }
                let Some(text) = &stored.text else {
                    let found = match &stored.id {
                        Some(id) => format!("it records that its data was written with keys (key id {id})"),
                        None => found.unwrap_or_default(),
                    };
                    return Err(KeyError::MissingInRedis {
                        redis: redis.to_owned(),
                        found,
                    });
                };
                (Keys::from_text(text, ORIGIN)?, ORIGIN)
            }
        };
        let mut keys = keys;
        if from == ORIGIN {
            keys.shared = stored.text.clone();
        }
        let id = keys.id();
        let recorded = match stored.id {
            Some(recorded) => recorded,
            // Written before this record existed: the stored keys are the data's, else these.
            None => {
                let first = match &stored.text {
                    Some(text) => Keys::from_text(text, ORIGIN)?.id(),
                    None => id.clone(),
                };
                store.record_keys_id(&first).await.map_err(redis_err)?
            }
        };
        if recorded != id {
            return Err(KeyError::MismatchInRedis {
                from: from.to_owned(),
                redis: redis.to_owned(),
                id,
                recorded,
            });
        }
        Ok(keys)
    }

    /// Checks every `every`, until `stopping`, that the Redis `store` still holds these keys
    /// (loaded by [`Keys::load_shared`]) and puts them back if it lost them (a restart without
    /// persistence, a deleted `ed:server-keys`): nodes started later then join with the keys
    /// every issued endpoint and secret was made with. Keys that are no longer the Redis's
    /// (another node started with `--reset-keys` or other `[keys]`) are logged as an error once:
    /// what this node issues is void on the other nodes until it restarts.
    pub async fn keep_shared(
        &self,
        store: &RedisStore,
        every: std::time::Duration,
        stopping: impl std::future::Future<Output = ()>,
    ) {
        let id = self.id();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stopping);
        let mut reported = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut stopping => return,
            }
            // An outage shows in /health and on every request; the next check retries.
            let Ok(stored) = store.server_keys().await else {
                continue;
            };
            let ours = stored.id.as_deref() == Some(id.as_str());
            if ours && (stored.text.is_some() || self.shared.is_none()) {
                reported = None;
                continue;
            }
            let stored = if stored.id.is_none() || ours {
                let put_back = match (&stored.text, stored.id.is_none()) {
                    (Some(_), true) => store.record_keys_id(&id).await.map(|recorded| StoredKeys {
                        id: Some(recorded),
                        ..stored
                    }),
                    _ => store.create_server_keys(self.shared.as_deref(), &id).await,
                };
                let Ok(now) = put_back else {
                    continue;
                };
                if now.id.as_deref() == Some(id.as_str()) {
                    tracing::warn!(
                        "Redis had lost the server keys (restarted without persistence?): put \
                         this node's back"
                    );
                    continue;
                }
                now
            } else {
                stored
            };
            if reported != stored.id {
                tracing::error!(
                    ours = %id,
                    redis = stored.id.as_deref().unwrap_or("(none)"),
                    "the server keys in Redis are no longer this node's (another node started \
                     with --reset-keys or other [keys]?): endpoints and secrets this node issues \
                     are void on the others; restart it"
                );
                reported = stored.id;
            }
        }
    }

    /// A digest naming these keys without revealing them: `endpoint:secret`, 8 bytes each.
    fn id(&self) -> String {
        let digest = |mac: &HmacSha256| {
            let mut mac = mac.clone();
            mac.update(b"key-id\0");
            let bytes = mac.finalize().into_bytes();
            bytes[..8].iter().map(|b| format!("{b:02x}")).collect::<String>()
        };
        format!("{}:{}", digest(&self.endpoint), digest(&self.secret))
    }

    /// The keys and where they came from (for errors), without the `keys.id` check.
    fn load_file(
        config: &KeysConfig,
        dir: &Path,
        store: Option<&Path>,
        reset: bool,
    ) -> Result<(Keys, String), KeyError> {
        if let Some(keys) = Keys::from_config(config)? {
            return Ok((keys, "[keys] endpoint_key and secret_key".to_owned()));
        }
        let path = dir.join("keys.toml");
        let shown = path.display().to_string();
        let file_err = |source| KeyError::File {
            path: shown.clone(),
            source,
        };
        let source = shown.clone();
        let keys = match std::fs::read_to_string(&path) {
            Ok(text) if !reset => Keys::from_text(&text, &shown),
            Ok(_) => {
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let kept = dir.join(format!("keys.toml.replaced-{secs}"));
                std::fs::rename(&path, &kept).map_err(file_err)?;
                tracing::warn!(
                    old = %kept.display(),
                    "--reset-keys: new keys; every endpoint and UAID secret issued so far is void"
                );
                Keys::create(dir, &path)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(store) = store.filter(|s| s.exists()) {
                    if !reset {
                        return Err(KeyError::Missing {
                            path: shown,
                            store: store.display().to_string(),
                        });
                    }
                    tracing::warn!(
                        "--reset-keys: new keys; every endpoint and UAID secret issued so far is void"
                    );
                }
                Keys::create(dir, &path)
            }
            Err(e) => Err(file_err(e)),
        }?;
        Ok((keys, source))
    }

    /// Generates keys into `path` (in `dir`), durably.
    fn create(dir: &Path, path: &Path) -> Result<Keys, KeyError> {
        let file_err = |source| KeyError::File {
            path: path.display().to_string(),
            source,
        };
        let text = Keys::generate_text();
        std::fs::create_dir_all(dir).map_err(file_err)?;
        write_private(path, text.as_bytes()).map_err(file_err)?;
        Keys::from_text(&text, &path.display().to_string())
    }

    /// The secret bound to `uaid`.
    pub fn uaid_secret(&self, uaid: &Uaid) -> String {
        let mut mac = self.secret.clone();
        mac.update(b"uaid-secret\0");
        mac.update(uaid.as_bytes());
        B64.encode(mac.finalize().into_bytes())
    }

    /// Constant-time check of a presented secret.
    pub fn check_secret(&self, uaid: &Uaid, presented: &str) -> bool {
        let Ok(bytes) = B64.decode(presented) else {
            return false;
        };
        let mut mac = self.secret.clone();
        mac.update(b"uaid-secret\0");
        mac.update(uaid.as_bytes());
        mac.verify_slice(&bytes).is_ok()
    }

    /// The opaque path segment for a token id.
    pub fn seal_token(&self, id: &TokenId) -> String {
        let mut raw = [0u8; 16 + TAG_LEN];
        raw[..16].copy_from_slice(&id.0);
        raw[16..].copy_from_slice(&self.token_tag(id)[..TAG_LEN]);
        B64.encode(raw)
    }

    /// The token id inside a path segment, or `None` when it was not issued with this key.
    pub fn open_token(&self, segment: &str) -> Option<TokenId> {
        if segment.len() != 43 {
            return None;
        }
        let mut raw = [0u8; 16 + TAG_LEN];
        let n = B64.decode_slice(segment, &mut raw).ok()?;
        if n != raw.len() {
            return None;
        }
        let id = TokenId(raw[..16].try_into().ok()?);
        let mut mac = self.endpoint.clone();
        mac.update(b"endpoint\0");
        mac.update(&id.0);
        mac.verify_truncated_left(&raw[16..]).ok()?;
        Some(id)
    }

    fn token_tag(&self, id: &TokenId) -> [u8; 32] {
        let mut mac = self.endpoint.clone();
        mac.update(b"endpoint\0");
        mac.update(&id.0);
        mac.finalize().into_bytes().into()
    }
}

/// Writes a file readable by its owner only, durably (fsync of file and directory).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::from_bytes(&[1; 32], &[2; 32])
    }

    #[test]
    fn tokens_round_trip_and_reject_tampering() {
        let k = keys();
        let id = TokenId::random();
        let token = k.seal_token(&id);
        assert_eq!(token.len(), 43);
        assert_eq!(k.open_token(&token), Some(id));
        let mut bytes = token.into_bytes();
        bytes[3] = if bytes[3] == b'A' { b'B' } else { b'A' };
        assert_eq!(k.open_token(std::str::from_utf8(&bytes).unwrap()), None);
        let other = Keys::from_bytes(&[9; 32], &[2; 32]);
        assert_eq!(other.open_token(&k.seal_token(&id)), None);
        assert_eq!(k.open_token("short"), None);
    }

    #[test]
    fn secrets_are_per_uaid() {
        let k = keys();
        let (a, b) = (Uaid::random(), Uaid::random());
        let sa = k.uaid_secret(&a);
        assert!(k.check_secret(&a, &sa));
        assert!(!k.check_secret(&b, &sa));
        assert!(!k.check_secret(&a, "not base64 !"));
    }

    #[test]
    fn a_store_without_its_keys_file_is_refused_unless_reset() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("sled");
        let k1 = Keys::load_for(&KeysConfig::default(), dir.path(), Some(&store), false).unwrap();
        std::fs::create_dir(&store).unwrap();
        std::fs::remove_file(dir.path().join("keys.toml")).unwrap();
        let err = Keys::load_for(&KeysConfig::default(), dir.path(), Some(&store), false).unwrap_err();
        assert!(matches!(err, KeyError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("--reset-keys"), "{err}");
        let k2 = Keys::load_for(&KeysConfig::default(), dir.path(), Some(&store), true).unwrap();
        let u = Uaid::random();
        assert_ne!(k1.uaid_secret(&u), k2.uaid_secret(&u));
        // A reset with the file present replaces it and keeps the old one aside.
        let k3 = Keys::load_for(&KeysConfig::default(), dir.path(), Some(&store), true).unwrap();
        assert_ne!(k2.uaid_secret(&u), k3.uaid_secret(&u));
        let kept = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("keys.toml.replaced-")
            })
            .count();
        assert_eq!(kept, 1);
    }

    #[test]
    fn keys_other_than_the_stores_are_refused_unless_reset() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("sled");
        let pinned = |byte: u8| KeysConfig {
            endpoint_key: B64.encode([byte; 32]),
            secret_key: B64.encode([byte + 1; 32]),
        };
        Keys::load_for(&pinned(1), dir.path(), Some(&store), false).unwrap();
        std::fs::create_dir(&store).unwrap();
        Keys::load_for(&pinned(1), dir.path(), Some(&store), false).unwrap();
        let err = Keys::load_for(&pinned(3), dir.path(), Some(&store), false).unwrap_err();
        assert!(matches!(err, KeyError::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains("[keys]"), "{err}");
        let id = std::fs::read_to_string(dir.path().join("keys.id")).unwrap();
        assert!(!id.contains(&B64.encode([1u8; 32])), "{id}");
        Keys::load_for(&pinned(3), dir.path(), Some(&store), true).unwrap();
        Keys::load_for(&pinned(3), dir.path(), Some(&store), false).unwrap();
        // Generated keys are recorded too: another instance's keys.toml is refused.
        std::fs::remove_file(dir.path().join("keys.id")).unwrap();
        let other = tempfile::tempdir().unwrap();
        Keys::load_for(&KeysConfig::default(), other.path(), None, false).unwrap();
        Keys::load_for(&KeysConfig::default(), dir.path(), Some(&store), true).unwrap();
        std::fs::copy(other.path().join("keys.toml"), dir.path().join("keys.toml")).unwrap();
        let err = Keys::load_for(&KeysConfig::default(), dir.path(), Some(&store), false).unwrap_err();
        assert!(matches!(err, KeyError::Mismatch { .. }), "{err}");
    }

    #[test]
    fn generated_keys_persist() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = Keys::load_for(&KeysConfig::default(), dir.path(), None, false).unwrap();
        let k2 = Keys::load_for(&KeysConfig::default(), dir.path(), None, false).unwrap();
        let u = Uaid::random();
        assert_eq!(k1.uaid_secret(&u), k2.uaid_secret(&u));
    }
}
