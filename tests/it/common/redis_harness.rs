//! Redis processes for tests: one server or a three-master cluster on free loopback ports,
//! killed on drop. Tests skip (with a message) only when redis-server is missing and `CI` is
//! unset; in CI a missing redis-server fails the test.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// Whether redis-server can run here; panics in CI when it cannot.
pub fn redis_available(test: &str) -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-server is not installed; CI must install it (.ci/run does)"
        );
        eprintln!("SKIPPED {test}: redis-server is not installed (apt-get install redis-server)");
    }
    found
}

/// Sends one inline command and returns the raw reply (enough for PING and CLUSTER INFO).
pub fn raw_command(port: u16, command: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("{command}\r\n").as_bytes()).ok()?;
    let mut buf = vec![0u8; 8192];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// One redis-server process.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    args: Vec<String>,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// In memory only: `--save "" --appendonly no`.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&["--save", "", "--appendonly", "no"])
    }

    /// With an append-only file fsynced on every write, in its own directory, so that a
    /// SIGKILL and restart keep every acknowledged write.
    pub fn start_persistent() -> RedisServer {
        RedisServer::start_with(&["--save", "", "--appendonly", "yes", "--appendfsync", "always"])
    }

    /// With extra redis-server arguments (persistence settings, for instance).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut args: Vec<String> = vec![
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            dir.path().display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut server = RedisServer {
            child: None,
            port,
            args,
            _dir: dir,
        };
        server.spawn_on_free_port(free_port);
        server
    }

    /// Starts redis-server on `self.port` and waits until that very process answers (not another
    /// one that took the port meanwhile). `false` if it exited (the port was taken).
    fn try_spawn(&mut self) -> bool {
        let mut child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let own = format!("process_id:{}", child.id());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            let info = raw_command(self.port, "INFO server").unwrap_or_default();
            if info.contains(&own) && raw_command(self.port, "PING").is_some_and(|r| r.starts_with("+PONG")) {
                self.child = Some(child);
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on {} did not answer",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn(&mut self) {
        assert!(self.try_spawn(), "redis-server could not bind port {}", self.port);
    }

    /// First start: on a port taken meanwhile by someone else, try another.
    fn spawn_on_free_port(&mut self, pick: fn() -> u16) {
        for _ in 0..10 {
            if self.try_spawn() {
                return;
            }
            let old = self.port;
            self.port = pick();
            for arg in self.args.iter_mut() {
                if *arg == old.to_string() {
                    *arg = self.port.to_string();
                }
            }
        }
        panic!("redis-server found no free port");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: Redis gets no chance to do anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory (an AOF, if any, is reloaded).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free port whose cluster bus port (+10000) is valid and free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// A Redis Cluster of `n` masters and no replicas.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(n: usize) -> RedisCluster {
        let mut nodes = Vec::with_capacity(n);
        for _ in 0..n {
            let dir = tempfile::tempdir().expect("tempdir");
            let port = free_cluster_port();
            let conf = dir.path().join("nodes.conf");
            let args: Vec<String> = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                &dir.path().display().to_string(),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &conf.display().to_string(),
                "--cluster-node-timeout",
                "2000",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let mut server = RedisServer {
                child: None,
                port,
                args,
                _dir: dir,
            };
            server.spawn_on_free_port(free_cluster_port);
            nodes.push(server);
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let status = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .expect("run redis-cli --cluster create (package redis-tools)");
        assert!(status.success(), "redis-cli --cluster create failed: {status}");
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &nodes {
            loop {
                let info = raw_command(node.port, "CLUSTER INFO").unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster did not become ok: {info}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        RedisCluster { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The URLs as a TOML array, for `EDITIOND_STORE__CLUSTER_URLS`.
    pub fn urls_toml(&self) -> String {
        let quoted: Vec<String> = self.urls().iter().map(|u| format!("\"{u}\"")).collect();
        format!("[{}]", quoted.join(", "))
    }
}

/// Env overrides that put an editiond node on this Redis server.
pub fn redis_env(redis: &RedisServer) -> Vec<(String, String)> {
    vec![
        ("EDITIOND_STORE__BACKEND".into(), "redis".into()),
        ("EDITIOND_STORE__URL".into(), redis.url()),
    ]
}
