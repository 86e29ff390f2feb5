//! A redis-server started by this tool for the multi-node runs (`--redis-server-bin`): one
//! process on a free 127.0.0.1 port with its own temp dir, killed and the dir removed on drop.
//! Also reads its CPU time and RSS from /proc, and its connected clients from `INFO`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::target::{free_port, temp_dir};
use crate::{sys, BoxError};

pub struct Redis {
    pub port: u16,
    pub pid: u32,
    child: Child,
    dir: PathBuf,
}

impl Redis {
    /// Starts `bin --port P --bind 127.0.0.1 --dir TEMP` plus `extra` (persistence settings) and
    /// waits until it answers PING.
    pub async fn spawn(bin: &Path, extra: &[String]) -> Result<Redis, BoxError> {
        let dir = temp_dir("redis")?;
        let port = free_port()?;
        let mut child = Command::new(bin)
            .arg("--port")
            .arg(port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&dir)
            .args(extra)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(reply) = command(port, "PING").await {
                if reply.starts_with("+PONG") {
                    break;
                }
            }
            let exited = child.try_wait()?;
            if exited.is_some() || Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_dir_all(&dir);
                return Err(match exited {
                    Some(status) => format!("redis-server exited during start-up: {status}").into(),
                    None => "redis-server did not answer PING within 10 s".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Redis {
            port,
            pid,
            child,
            dir,
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// CPU seconds (utime + stime from /proc/PID/stat) Redis has used.
    pub fn cpu_seconds(&self) -> Result<f64, BoxError> {
        Ok(sys::cpu_seconds(self.pid)?)
    }

    pub fn rss(&self) -> Result<u64, BoxError> {
        Ok(sys::rss_bytes(self.pid)?)
    }

    /// One field of `INFO` (e.g. `connected_clients`, `used_memory`).
    pub async fn info_field(&self, name: &str) -> Result<f64, BoxError> {
        let reply = command(self.port, "INFO").await?;
        reply
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(':')?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .ok_or_else(|| format!("no {name} in Redis INFO").into())
    }

    /// Fails if Redis has exited.
    pub fn check_alive(&mut self) -> Result<(), BoxError> {
        match self.child.try_wait()? {
            Some(status) => Err(format!("redis-server exited: {status}").into()),
            None => Ok(()),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends one inline command and reads the whole reply (a simple or bulk string; enough for PING
/// and INFO).
async fn command(port: u16, cmd: &str) -> Result<String, BoxError> {
    let io = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(format!("{cmd}\r\n").as_bytes()).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if reply_complete(&buf) {
                break;
            }
        }
        Ok::<_, BoxError>(String::from_utf8_lossy(&buf).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .map_err(|_| "Redis did not answer within 5 s")?
}

/// Whether `buf` holds one whole RESP reply of the kinds [`command`] reads.
fn reply_complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    match buf.first() {
        Some(b'$') => {
            let len: i64 = String::from_utf8_lossy(&buf[1..end]).parse().unwrap_or(-1);
            len < 0 || buf.len() >= end + 2 + len as usize + 2
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::reply_complete;

    #[test]
    fn replies() {
        assert!(!reply_complete(b"+PON"));
        assert!(reply_complete(b"+PONG\r\n"));
        assert!(!reply_complete(b"$5\r\nab"));
        assert!(reply_complete(b"$5\r\nabcde\r\n"));
        assert!(reply_complete(b"$-1\r\n"));
    }
}
