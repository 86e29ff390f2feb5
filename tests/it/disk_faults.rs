//! Disk faults: a data dir that fills up or turns read-only must give 503 + `Retry-After`, never
//! a 2xx for a write that was not stored, and the service must come back once the disk does.
//!
//! * Full: the data dir is a small tmpfs mounted for the test (root only: without the right to
//!   mount, the test says so and passes, except in CI where it must run), filled to the last
//!   byte by a filler file while app servers PUT.
//! * Read-only: an `LD_PRELOAD` shim (its C source is below, compiled with `cc`) fails every
//!   write, sync and truncate on a file under the data dir with `EROFS` while a flag file exists,
//!   the way a filesystem remounted read-only after an error does. (A real `remount,ro` is
//!   refused while the server holds its files open for writing.)
//! * Read-only at start: the server refuses to start, saying why, instead of serving.
//! * No request commits: the same shim fails with `EIO` under the sweep's writes, which take no
//!   commit ticket; the commit thread's idle probe must still stop the node (it never exited
//!   without the probe: checked by disabling it).
//!
//! After a failed commit the server stops promising durability: it begins its graceful shutdown
//! (sockets told to go, `/health` 503) and exits with 75 (`EX_TEMPFAIL`) for its supervisor to
//! restart it. Each fault test then starts it again as a supervisor would: on the still-failing
//! disk (it refuses to start saying why, or serves and stops again at the first write), and on
//! the healed disk, where every version answered 2xx is delivered and new PUTs are stored.
//! Nothing waits on a clock: each phase runs until the server's answers show the fault. The one
//! bound asserted is the documented one: the exit comes within `shutdown_grace_secs` plus
//! [`EXIT_BOUND`].

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::json;
use tokio::io::AsyncWriteExt as _;

/// `editiond::server::EXIT_STORE_FAILED`, as documented for operators (`serve --help`).
const EXIT_STORE_FAILED: i32 = 75;

/// The grace period the fault tests configure: a request whose body never comes holds the drain
/// open that long, so `/health` can be seen answering 503 while the server stops.
const GRACE_SECS: u64 = 4;

/// What the exit may take beyond the grace period: the force-close bound, the background tasks
/// and the final flush, and a loaded test machine.
const EXIT_BOUND: Duration = Duration::from_secs(10);

/// The shim: `FAIL_DIR` names the data dir, `FAIL_FLAG` a file whose existence turns faults on,
/// `FAIL_ERRNO` the error (30 = EROFS, 28 = ENOSPC).
const SHIM_C: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/types.h>
#include <sys/uio.h>
static int failing(int fd) {
    const char *flag = getenv("FAIL_FLAG"), *dir = getenv("FAIL_DIR"), *no = getenv("FAIL_ERRNO");
    if (!flag || !dir || !no || access(flag, F_OK) != 0) return 0;
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    if (strncmp(path, dir, strlen(dir)) != 0) return 0;
    errno = atoi(no);
    return 1;
}
#define WRAP(ret, name, params, args) \
  ret name params { static ret (*real) params; if (!real) real = dlsym(RTLD_NEXT, #name); \
                    if (failing(fd)) return -1; return real args; }
WRAP(int, fsync, (int fd), (fd))
WRAP(int, fdatasync, (int fd), (fd))
WRAP(int, sync_file_range, (int fd, off64_t o, off64_t n, unsigned int f), (fd, o, n, f))
WRAP(ssize_t, write, (int fd, const void *b, size_t n), (fd, b, n))
WRAP(ssize_t, writev, (int fd, const struct iovec *v, int c), (fd, v, c))
WRAP(ssize_t, pwrite, (int fd, const void *b, size_t n, off_t o), (fd, b, n, o))
WRAP(ssize_t, pwrite64, (int fd, const void *b, size_t n, off64_t o), (fd, b, n, o))
WRAP(ssize_t, pwritev, (int fd, const struct iovec *v, int c, off_t o), (fd, v, c, o))
WRAP(ssize_t, pwritev64, (int fd, const struct iovec *v, int c, off64_t o), (fd, v, c, o))
WRAP(int, ftruncate, (int fd, off_t n), (fd, n))
WRAP(int, ftruncate64, (int fd, off64_t n), (fd, n))
WRAP(int, fallocate, (int fd, int m, off_t o, off_t n), (fd, m, o, n))
WRAP(int, fallocate64, (int fd, int m, off64_t o, off64_t n), (fd, m, o, n))
"#;

/// The shim, built once per test process into `dir`.
fn shim(dir: &Path) -> PathBuf {
    let source = dir.join("failwrite.c");
    let lib = dir.join("failwrite.so");
    std::fs::write(&source, SHIM_C).unwrap();
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&lib)
        .arg(&source)
        .arg("-ldl")
        .status()
        .expect("cc (gcc) is needed to build the test shim");
    assert!(status.success(), "building the shim failed");
    lib
}

/// A tmpfs of `size` mounted at `at`, unmounted on drop; `None` where mounting is not allowed.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Some(Tmpfs(at.to_owned()))
        } else if std::env::var_os("CI").is_some() {
            panic!("CI runs as root and must be able to mount a tmpfs for this test");
        } else {
            eprintln!("skipped: cannot mount a tmpfs here (needs root)");
            None
        }
    }

    fn remount(&self, mode: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount {mode}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem holding `path` to the last byte.
fn fill(path: &Path) {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 64 * 1024];
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling: {e}"),
        }
    }
    // The last partial block, byte by byte.
    while f.write(&[0]).is_ok_and(|n| n == 1) {}
}

/// What the PUTs of one phase learnt: the highest version answered 2xx per registration.
struct Puts {
    answered: Vec<u64>,
    next: u64,
}

impl Puts {
    /// PUTs to every endpoint in turn until `n503` answers are 503 (with a `Retry-After`), or the
    /// server is gone after at least one 503 (it stops after a failed commit), or `max` PUTs. Any
    /// status other than 200/202/503 fails the test.
    async fn until_503(
        &mut self,
        http: &reqwest::Client,
        endpoints: &[String],
        n503: usize,
        max: usize,
    ) -> usize {
        let mut seen503 = 0;
        for i in 0..max {
            let r = i % endpoints.len();
            let version = self.next;
            self.next += 1;
            let response = match http
                .put(&endpoints[r])
                .body(format!("version={version}"))
                .send()
                .await
            {
                Ok(response) => response,
                Err(_) if seen503 > 0 => return i + 1,
                Err(e) => panic!("the server answers PUTs until the disk fault shows: {e}"),
            };
            match response.status().as_u16() {
                200 | 202 => self.answered[r] = self.answered[r].max(version),
                503 => {
                    let retry = response
                        .headers()
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap().to_owned());
                    let secs: u64 = retry
                        .as_deref()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or_else(|| panic!("503 without a numeric Retry-After: {retry:?}"));
                    assert!(secs >= 1);
                    let body: serde_json::Value = response.json().await.expect("a 503 has a JSON body");
                    // `shutting_down` once the server stops after the failed commit.
                    assert!(
                        body["error"] == "store_unavailable"
                            || (seen503 > 0 && body["error"] == "shutting_down"),
                        "{body}"
                    );
                    seen503 += 1;
                    if seen503 >= n503 {
                        return i + 1;
                    }
                }
                other => panic!("PUT answered {other} on a failing disk"),
            }
        }
        panic!("{max} PUTs and the disk fault never showed as 503");
    }
}

/// Registers `n` pairs on one UAID; returns (credentials, appids, endpoints).
async fn enroll_n(server: &Server, n: usize) -> ((String, String), Vec<String>, Vec<String>) {
    let mut c = Client::connect(server).await;
    let creds = c.hello_new(1).await.remove(0);
    let mut appids = Vec::new();
    let mut endpoints = Vec::new();
    for _ in 0..n {
        let appid = new_appid();
        endpoints.push(c.register(&creds.0, &appid).await);
        appids.push(appid);
    }
    (creds, appids, endpoints)
}

/// After a restart on a healed disk: every answered version (or a newer attempted one) arrives,
/// and new PUTs are stored again.
async fn check_delivered(server: &Server, creds: &(String, String), appids: &[String], puts: &Puts) {
    let http = reqwest::Client::new();
    let mut c = Client::connect(server).await;
    c.send(json!({"type": "hello", "uaids": [{"uaid": creds.0, "secret": creds.1}]}))
        .await;
    assert_eq!(c.expect("hello").await["uaids"][0]["status"], 200);
    let update = c.expect("update").await;
    for (i, appid) in appids.iter().enumerate() {
        let got = update["updates"][&creds.0][appid].as_u64();
        let answered = puts.answered[i];
        if answered > 0 {
            let got = got.unwrap_or_else(|| panic!("version {answered} answered 2xx was lost: {update}"));
            assert!(got >= answered, "delivered {got} < answered {answered}");
            assert!(got < puts.next, "a version nobody sent");
        }
    }
    c.ack(&[&creds.0]).await;
    c.barrier().await;
    // And the disk takes writes again.
    let endpoint = c.register(&creds.0, &appids[0]).await;
    assert_eq!(put_version(&http, &endpoint, puts.next).await, 202);
    assert_eq!(
        c.expect("update").await["updates"][&creds.0][&appids[0]],
        puts.next
    );
}

/// `/health` status.
async fn health(server: &Server) -> u16 {
    reqwest::get(server.url("/health"))
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The configuration the fault tests run with (besides a shim's variables).
const GRACE_ENV: (&str, &str) = ("EDITIOND_SERVER__SHUTDOWN_GRACE_SECS", "4");

/// What a fault test holds open while the disk fails: a WebSocket client (it must be told to go)
/// and a request whose body never comes (it keeps the drain, and so `/health` 503, for the grace
/// period; its body timeout is the default 30 s).
struct Onlookers {
    ws: Client,
    _slow: tokio::net::TcpStream,
}

impl Onlookers {
    async fn join(server: &Server) -> Onlookers {
        let mut ws = Client::connect(server).await;
        ws.hello_new(1).await;
        let mut slow = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        slow.write_all(b"POST /v1/poll HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            .await
            .unwrap();
        // A round trip, so the server has read those headers before the disk fails.
        assert_eq!(health(server).await, 200);
        Onlookers { ws, _slow: slow }
    }
}

/// After the first 503 of a fault: `/health` 503, the socket told to go, and the process gone
/// with [`EXIT_STORE_FAILED`] within the grace period plus [`EXIT_BOUND`] of `fault`.
async fn stops_for_a_restart(server: &mut Server, onlookers: &mut Onlookers, fault: Instant) {
    assert_eq!(GRACE_ENV.1.parse::<u64>().unwrap(), GRACE_SECS);
    assert_eq!(health(server).await, 503, "/health tells a load balancer");
    onlookers.ws.expect_error_close(503, "shutting_down", 1001).await;
    let status = server.wait_exit();
    let took = fault.elapsed();
    eprintln!("stopped {took:?} after the fault: {status}");
    assert_eq!(status.code(), Some(EXIT_STORE_FAILED), "{status}");
    assert!(
        took <= Duration::from_secs(GRACE_SECS) + EXIT_BOUND,
        "exit took {took:?}"
    );
}

/// A process killed on drop, so a failed assertion leaves nothing running.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary again on `server`'s port and data dir while the disk still fails, as a
/// supervisor would. Either it refuses to start with a non-zero status and a message containing
/// `reason`, or it serves `/health` and reads, answers a write with 503, and exits
/// [`EXIT_STORE_FAILED`] again. Returns which ("refused" or "stopped at the first write").
async fn start_on_the_failing_disk(
    server: &Server,
    env: &[(&str, &str)],
    endpoint: &str,
    version: u64,
    reason: &str,
) -> &'static str {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_editiond"));
    cmd.arg("serve")
        .arg("--listen")
        .arg(server.addr.to_string())
        .arg("--data-dir")
        .arg(&server.data_dir)
        .arg("--config")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut proc = Proc(cmd.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = proc.0.try_wait().unwrap() {
            let mut stderr = String::new();
            proc.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
            eprintln!("start on the failing disk: {status}: {}", stderr.trim());
            assert!(!status.success(), "{status}");
            assert!(stderr.contains(reason), "the reason is named: {stderr}");
            return "refused";
        }
        if reqwest::get(server.url("/health"))
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
        assert!(Instant::now() < deadline, "neither started nor refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It serves; the first write fails its commit and it stops again.
    assert_eq!(put_version(&reqwest::Client::new(), endpoint, version).await, 503);
    let deadline = Instant::now() + Duration::from_secs(GRACE_SECS) + EXIT_BOUND;
    loop {
        if let Some(status) = proc.0.try_wait().unwrap() {
            assert_eq!(status.code(), Some(EXIT_STORE_FAILED), "{status}");
            return "stopped at the first write";
        }
        assert!(Instant::now() < deadline, "still running after a failed commit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn full_disk_answers_503_stops_with_75_and_recovers_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&dir.path().join("mnt"), "24m") else {
        return;
    };
    let mut server = Server::start_with(&fs.0, &[GRACE_ENV]).await;
    let (creds, appids, endpoints) = enroll_n(&server, 8).await;
    let http = reqwest::Client::new();
    let mut puts = Puts {
        answered: vec![0; endpoints.len()],
        next: 1,
    };
    // Some writes succeed first, so there is something to lose.
    for (i, e) in endpoints.iter().enumerate() {
        assert_eq!(put_version(&http, e, puts.next).await, 202);
        puts.answered[i] = puts.next;
        puts.next += 1;
    }
    let mut onlookers = Onlookers::join(&server).await;
    let filler = fs.0.join("filler");
    fill(&filler);
    let n = puts.until_503(&http, &endpoints, 5, 100_000).await;
    let fault = Instant::now();
    eprintln!("full disk: 503 after {n} PUTs");
    stops_for_a_restart(&mut server, &mut onlookers, fault).await;

    // Restarted on the full disk, then once space returns.
    let outcome = start_on_the_failing_disk(
        &server,
        &[GRACE_ENV],
        &endpoints[0],
        puts.next,
        "No space left on device",
    )
    .await;
    eprintln!("full disk, restarted: {outcome}");
    puts.next += 1;
    std::fs::remove_file(&filler).unwrap();
    server.restart().await;
    assert_eq!(health(&server).await, 200);
    check_delivered(&server, &creds, &appids, &puts).await;
    drop(server);
    drop(fs);
}

#[tokio::test]
async fn read_only_disk_answers_503_stops_with_75_and_recovers_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let shim = shim(dir.path());
    let flag = dir.path().join("fail-now");
    let data = dir.path().join("data");
    let env = [
        ("LD_PRELOAD", shim.to_str().unwrap()),
        ("FAIL_FLAG", flag.to_str().unwrap()),
        ("FAIL_DIR", data.to_str().unwrap()),
        ("FAIL_ERRNO", "30"),
        GRACE_ENV,
    ];
    let mut server = Server::start_with(dir.path(), &env).await;
    assert_eq!(server.data_dir, data);
    let (creds, appids, endpoints) = enroll_n(&server, 8).await;
    let http = reqwest::Client::new();
    let mut puts = Puts {
        answered: vec![0; endpoints.len()],
        next: 1,
    };
    for (i, e) in endpoints.iter().enumerate() {
        assert_eq!(put_version(&http, e, puts.next).await, 202);
        puts.answered[i] = puts.next;
        puts.next += 1;
    }
    let mut onlookers = Onlookers::join(&server).await;
    std::fs::write(&flag, b"").unwrap();
    let n = puts.until_503(&http, &endpoints, 5, 100_000).await;
    let fault = Instant::now();
    eprintln!("read-only disk: 503 after {n} PUTs");
    stops_for_a_restart(&mut server, &mut onlookers, fault).await;

    let outcome =
        start_on_the_failing_disk(&server, &env, &endpoints[0], puts.next, "Read-only file system").await;
    eprintln!("read-only disk, restarted: {outcome}");
    puts.next += 1;
    std::fs::remove_file(&flag).unwrap();
    server.restart().await;
    assert_eq!(health(&server).await, 200);
    check_delivered(&server, &creds, &appids, &puts).await;
}

#[tokio::test]
async fn a_write_error_no_request_commits_still_stops_the_node() {
    // The sweep's writes take no commit ticket: only the commit thread's idle probe can see the
    // disk fail under them (sled's own background flush meets the error and keeps it to itself).
    let dir = tempfile::tempdir().unwrap();
    let shim = shim(dir.path());
    let flag = dir.path().join("fail-now");
    let data = dir.path().join("data");
    let env = [
        ("LD_PRELOAD", shim.to_str().unwrap()),
        ("FAIL_FLAG", flag.to_str().unwrap()),
        ("FAIL_DIR", data.to_str().unwrap()),
        ("FAIL_ERRNO", "5"),
        ("EDITIOND_LIMITS__SWEEP_INTERVAL_SECS", "1"),
        GRACE_ENV,
    ];
    let mut server = Server::start_with(dir.path(), &env).await;
    // Nobody holds the UAID: the event waits, expires, and the sweep clears it.
    let (_creds, _appids, endpoints) = enroll_n(&server, 1).await;
    let http = reqwest::Client::new();
    let put = http
        .put(&endpoints[0])
        .header("ttl", "3")
        .body("version=1")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 202);
    // EIO from now on; nothing in this test asks for a commit again.
    std::fs::write(&flag, b"").unwrap();
    let status = server.wait_exit();
    assert_eq!(status.code(), Some(EXIT_STORE_FAILED), "{status}");
    std::fs::remove_file(&flag).unwrap();
    server.restart().await;
    assert_eq!(put_version(&http, &endpoints[0], 2).await, 202);
}

#[tokio::test]
async fn read_only_data_dir_at_start_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&dir.path().join("mnt"), "24m") else {
        return;
    };
    // A data dir with a store in it, then the filesystem turns read-only.
    let mut server = Server::start(&fs.0).await;
    let (_creds, _appids, endpoints) = enroll_n(&server, 1).await;
    assert_eq!(put_version(&reqwest::Client::new(), &endpoints[0], 1).await, 202);
    server.kill();
    fs.remount("ro");
    let out = Command::new(env!("CARGO_BIN_EXE_editiond"))
        .arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--data-dir")
        .arg(fs.0.join("data"))
        .arg("--config")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("read-only start: {}", stderr.trim());
    assert!(!out.status.success(), "started on a read-only data dir");
    assert!(
        stderr.to_lowercase().contains("read-only"),
        "the reason is named: {stderr}"
    );
    fs.remount("rw");
}
