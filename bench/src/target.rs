//! The editiond under test: either spawned here (`--server-bin`, with a fresh temp data dir on a
//! free 127.0.0.1 port) or one already running (`--target ADDR --server-pid PID`). Also reads
//! its `/health` and `/metrics`, and its RSS.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{http, sys, BoxError};

pub struct Target {
    pub addr: SocketAddr,
    pub pid: u32,
    /// Present when this process started the server: killed and its data dir removed on drop.
    spawned: Option<(Child, PathBuf)>,
}

/// A free loopback port: bound, then released for the child to bind.
pub fn free_port() -> Result<u16, BoxError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A fresh directory under the system temp dir, unique to this process and call.
pub fn temp_dir(tag: &str) -> Result<PathBuf, BoxError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("editiond-bench-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Waits until `GET /health` answers 200, or the child exits, or 30 s pass.
pub async fn wait_healthy(addr: SocketAddr, child: &mut Child) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok((200, _)) = http::get(addr, "/health").await {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            return Err(format!("server exited during start-up: {status}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("server did not become healthy within 30 s".into())
}

impl Target {
    /// Starts `bin serve` on a free port with a temp data dir and built-in defaults (it runs in
    /// that dir, so no config.toml is picked up); `env` adds `EDITIOND_*` overrides.
    pub async fn spawn(bin: &Path, env: &[(String, String)]) -> Result<Target, BoxError> {
        Target::spawn_command(bin, &["serve"], env).await
    }

    /// [`Target::spawn`] with another subcommand, e.g. `relay --upstream ws://…`.
    pub async fn spawn_command(
        bin: &Path,
        command: &[&str],
        env: &[(String, String)],
    ) -> Result<Target, BoxError> {
        // The child runs in its temp dir, so a relative path must be resolved here.
        let bin =
            std::fs::canonicalize(bin).map_err(|e| format!("editiond binary {}: {e}", bin.display()))?;
        let dir = temp_dir("server")?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let mut cmd = Command::new(&bin);
        cmd.args(command)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(dir.join("data"))
            .current_dir(&dir)
            .env(
                "RUST_LOG",
                std::env::var("BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // Every bench client comes from 127.0.0.1 and asks for a new UAID: the per-address
            // limit on new UAIDs would measure itself (`--server-env` may set it back).
            .env("EDITIOND_LIMITS__UAID_RATE_PER_SEC", "0");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        if let Err(e) = wait_healthy(addr, &mut child).await {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(Target {
            addr,
            pid: child.id(),
            spawned: Some((child, dir)),
        })
    }

    /// A server someone else runs.
    pub fn attach(addr: SocketAddr, pid: u32) -> Target {
        Target {
            addr,
            pid,
            spawned: None,
        }
    }

    pub fn rss(&self) -> Result<u64, BoxError> {
        Ok(sys::rss_bytes(self.pid)?)
    }

    /// Fails if a server this process started has exited.
    pub fn check_alive(&mut self) -> Result<(), BoxError> {
        if let Some((child, _)) = &mut self.spawned {
            if let Some(status) = child.try_wait()? {
                return Err(format!("editiond exited: {status}").into());
            }
        }
        Ok(())
    }

    /// Open WebSocket connections, from `/health`.
    pub async fn connections(&self) -> Result<u64, BoxError> {
        let (status, body) = http::get(self.addr, "/health").await?;
        if status != 200 {
            return Err(format!("/health answered {status}").into());
        }
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        v["connections"]
            .as_u64()
            .ok_or_else(|| "no connections in /health".into())
    }

    /// CPU seconds the server has used.
    pub fn cpu_seconds(&self) -> Result<f64, BoxError> {
        Ok(sys::cpu_seconds(self.pid)?)
    }

    /// Cumulative buckets `(le, count)` of one histogram from `/metrics`.
    pub async fn buckets(&self, name: &str) -> Result<Vec<(f64, f64)>, BoxError> {
        let (_, body) = http::get(self.addr, "/metrics").await?;
        let text = String::from_utf8_lossy(&body);
        let prefix = format!("{name}_bucket{{le=\"");
        Ok(text
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(&prefix)?;
                let (le, count) = rest.split_once("\"} ")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, count.trim().parse().ok()?))
            })
            .collect())
    }

    /// One unlabelled gauge or counter from `/metrics`.
    pub async fn metric(&self, name: &str) -> Result<f64, BoxError> {
        let (status, body) = http::get(self.addr, "/metrics").await?;
        if status != 200 {
            return Err(format!("/metrics answered {status}").into());
        }
        let text = String::from_utf8_lossy(&body);
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (key, value) = l.split_once(' ')?;
                (key == name).then(|| value.trim().parse::<f64>().ok())?
            })
            .ok_or_else(|| format!("no metric {name}").into())
    }

    /// Polls `/health` until the server holds at most `n` sockets, for up to `limit`.
    pub async fn wait_connections_at_most(&self, n: u64, limit: Duration) -> Result<(), BoxError> {
        let deadline = Instant::now() + limit;
        loop {
            let open = self.connections().await?;
            if open <= n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("server still holds {open} sockets after {limit:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some((mut child, dir)) = self.spawned.take() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The nodes of one service (one node on sled; one or more on one Redis), read as a whole.
pub mod nodes {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use super::Target;
    use crate::BoxError;

    pub fn addrs(nodes: &[Target]) -> Vec<SocketAddr> {
        nodes.iter().map(|t| t.addr).collect()
    }

    /// Sum of the nodes' RSS, bytes.
    pub fn rss(nodes: &[Target]) -> Result<u64, BoxError> {
        nodes.iter().map(|t| t.rss()).sum()
    }

    /// Sum of the nodes' CPU seconds.
    pub fn cpu_seconds(nodes: &[Target]) -> Result<f64, BoxError> {
        nodes.iter().map(|t| t.cpu_seconds()).sum()
    }

    /// Sum of the nodes' open WebSocket connections.
    pub async fn connections(nodes: &[Target]) -> Result<u64, BoxError> {
        let mut total = 0;
        for t in nodes {
            total += t.connections().await?;
        }
        Ok(total)
    }

    /// Polls until the nodes hold at most `n` sockets in total, for up to `limit`.
    pub async fn wait_connections_at_most(nodes: &[Target], n: u64, limit: Duration) -> Result<(), BoxError> {
        let deadline = Instant::now() + limit;
        loop {
            let open = connections(nodes).await?;
            if open <= n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("the nodes still hold {open} sockets after {limit:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn check_alive(nodes: &mut [Target]) -> Result<(), BoxError> {
        nodes.iter_mut().try_for_each(|t| t.check_alive())
    }
}
