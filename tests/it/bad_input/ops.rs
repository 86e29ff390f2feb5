//! What an operator sees (issue 9, findings 2, 4 and 5): the connection cap and running out of
//! file descriptors are logged and counted; a store whose keys are lost refuses to start; config
//! and start-up errors name their real source, once.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::http_conn::closed_within;
use super::*;
use tokio::net::TcpStream;

/// A server started with its stderr in a file, so that tests can read its log.
struct Logged {
    child: Child,
    addr: std::net::SocketAddr,
    log: PathBuf,
}

impl Logged {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits up to WAIT for the log to contain `text`.
    async fn wait_log(&self, text: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} in the log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `editiond serve` on a free port with data in `dir/data`, `env` and `extra` arguments; with
/// `nofile`, under that open-file limit. `Err` with the log if it exits before it is healthy.
async fn start_logged(
    dir: &Path,
    env: &[(&str, &str)],
    extra: &[&str],
    nofile: Option<u32>,
) -> Result<Logged, (std::process::ExitStatus, String)> {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = dir.join(format!("editiond-{}.log", addr.port()));
    let bin = env!("CARGO_BIN_EXE_editiond");
    let mut cmd = match nofile {
        Some(n) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                .arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.arg("serve")
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(extra)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut logged = Logged {
        child: cmd.spawn().expect("start editiond"),
        addr,
        log,
    };
    let deadline = Instant::now() + 3 * WAIT;
    loop {
        if let Ok(r) = reqwest::get(logged.url("/health")).await {
            if r.status() == 200 {
                return Ok(logged);
            }
        }
        if let Some(status) = logged.child.try_wait().unwrap() {
            return Err((status, logged.log()));
        }
        assert!(
            Instant::now() < deadline,
            "editiond did not become healthy:\n{}",
            logged.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Retries `GET path` until the server accepts the connection (it may be at its cap).
async fn get_text(logged: &Logged, path: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(r) = reqwest::get(logged.url(path)).await {
            if r.status() == 200 {
                return r.text().await.unwrap();
            }
        }
        assert!(Instant::now() < deadline, "GET {path} kept failing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn connections_beyond_max_connections_get_503_logged_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("EDITIOND_LIMITS__MAX_CONNECTIONS", "4"),
        ("EDITIOND_LIMITS__HTTP_IDLE_TIMEOUT_SECS", "600"),
    ];
    let server = start_logged(dir.path(), &env, &[], None).await.unwrap();
    let mut held = Vec::new();
    let refused = loop {
        assert!(
            held.len() <= 4,
            "{} connections held open, the cap is 4",
            held.len()
        );
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        // An accepted connection waits for its request; a refused one is answered and closed.
        match closed_within(&mut tcp, Duration::from_millis(300)).await {
            None => held.push(tcp),
            Some(got) => break String::from_utf8_lossy(&got).into_owned(),
        }
    };
    let (head, body) = refused.split_once("\r\n\r\n").expect("an answer");
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(head.to_ascii_lowercase().contains("retry-after: 1"), "{head}");
    check_error_body(body, 503, "too_many_connections");
    server.wait_log("connection limit reached").await;
    drop(held);
    let metrics = get_text(&server, "/metrics").await;
    let refused_total = metrics
        .lines()
        .find_map(|l| l.strip_prefix("editiond_connections_refused_total "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no refused counter:\n{metrics}"));
    assert!(refused_total >= 1, "{metrics}");
    assert!(metrics.contains("editiond_tcp_connections "), "{metrics}");
}

#[tokio::test]
async fn running_out_of_file_descriptors_is_logged_and_survived() {
    let dir = tempfile::tempdir().unwrap();
    // A cap above the open-file limit, so that accept itself fails.
    let env = [
        ("EDITIOND_LIMITS__MAX_CONNECTIONS", "100000"),
        ("EDITIOND_LIMITS__HTTP_IDLE_TIMEOUT_SECS", "600"),
    ];
    let server = start_logged(dir.path(), &env, &[], Some(96)).await.unwrap();
    server.wait_log("is not below the open-file limit").await;
    let mut held = Vec::new();
    for _ in 0..150 {
        held.push(TcpStream::connect(server.addr).await.unwrap());
    }
    server.wait_log("out of file descriptors").await;
    drop(held);
    assert!(get_text(&server, "/health").await.contains("\"ok\""));
    let metrics = get_text(&server, "/metrics").await;
    let errors = metrics
        .lines()
        .find_map(|l| l.strip_prefix("editiond_accept_errors_total "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no accept error counter:\n{metrics}"));
    assert!(errors >= 1, "{metrics}");
}

#[tokio::test]
async fn a_store_whose_keys_file_is_lost_refuses_to_start_unless_reset() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_logged(dir.path(), &[], &[], None).await.unwrap();
    drop(server);
    std::fs::remove_file(dir.path().join("data/keys.toml")).unwrap();
    let (status, log) = start_logged(dir.path(), &[], &[], None)
        .await
        .err()
        .expect("started without its keys");
    assert!(!status.success());
    assert!(log.contains("keys.toml is missing"), "{log}");
    assert!(log.contains("--reset-keys"), "{log}");
    assert!(
        !dir.path().join("data/keys.toml").exists(),
        "keys were generated anyway"
    );
    let server = start_logged(dir.path(), &[], &["--reset-keys"], None)
        .await
        .unwrap();
    assert!(dir.path().join("data/keys.toml").exists());
    drop(server);
    // Once reset, the new keys are the store's keys: a plain restart works.
    start_logged(dir.path(), &[], &[], None).await.unwrap();
}

/// Runs `editiond ARGS` in an empty directory with `env`; returns (exit code, stdout, stderr).
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_editiond"))
        .args(args)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .current_dir(dir.path())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn config_errors_name_their_source_once() {
    let (code, _, err) = run(&["config"], &[("EDITIOND_LIMITS__MAX_FRAME_BYTE", "1")]);
    assert_eq!(code, 2);
    assert!(
        err.starts_with("editiond: EDITIOND_LIMITS__MAX_FRAME_BYTE: unknown field"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let (code, _, err) = run(
        &["config"],
        &[("EDITIOND_SERVER__PUBLIC_URL", "push.example.com")],
    );
    assert_eq!(code, 2);
    assert!(
        err.starts_with("editiond: EDITIOND_SERVER__PUBLIC_URL: server.public_url"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[limits]\nmax_frame_bytes = 10\n").unwrap();
    let (code, _, err) = run(&["config", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(
        err.starts_with(&format!("editiond: {}: limits.max_frame_bytes", file.display())),
        "{err}"
    );
    // Log filters that would print nothing are refused, in the config and in RUST_LOG.
    let (code, _, err) = run(&["config"], &[("EDITIOND_SERVER__LOG", "loud")]);
    assert_eq!(code, 2);
    assert!(
        err.starts_with("editiond: EDITIOND_SERVER__LOG: server.log: invalid log filter"),
        "{err}"
    );
    let (code, _, err) = run(
        &["serve", "--listen", "127.0.0.1:0"],
        &[("RUST_LOG", "editiond=loud")],
    );
    assert_eq!(code, 2);
    assert!(err.starts_with("editiond: RUST_LOG: invalid log filter"), "{err}");
}

#[tokio::test]
async fn config_prints_listen_forms_set_secrets_and_a_trimmed_public_url() {
    let env = [
        (
            "EDITIOND_KEYS__SECRET_KEY",
            "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTEyMzQ",
        ),
        ("EDITIOND_SERVER__PUBLIC_URL", "https://push.example.com/"),
    ];
    let (code, out, err) = run(&["config", "--listen", "localhost:8093"], &env);
    assert_eq!(code, 0, "{err}");
    let listen = out.lines().find(|l| l.starts_with("listen = ")).unwrap();
    assert!(
        ["listen = \"127.0.0.1:8093\"", "listen = \"[::1]:8093\""].contains(&listen),
        "{listen}"
    );
    assert!(out.contains("secret_key = \"(set)\""), "{out}");
    assert!(out.contains("endpoint_key = \"\""), "{out}");
    assert!(!out.contains("c2VjcmV0"), "{out}");
    assert!(
        out.contains("public_url = \"https://push.example.com\"\n"),
        "{out}"
    );
    let (code, out, err) = run(&["config", "--listen", ":8093"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("listen = \"0.0.0.0:8093\""), "{out}");
    let (code, _, err) = run(&["config", "--listen", "nowhere"], &[]);
    assert_eq!(code, 2, "{err}");
}

#[tokio::test]
async fn start_failures_are_printed_once_and_a_held_data_dir_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_logged(dir.path(), &[], &[], None).await.unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let port = format!("127.0.0.1:{}", free_port());
    let (code, _, err) = run(&["serve", "--listen", &port, "--data-dir", data], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("another editiond is using"), "{err}");
    assert_eq!(err.matches("another editiond").count(), 1, "{err}");
    let other = tempfile::tempdir().unwrap();
    let taken = server.addr.to_string();
    let other_data = other.path().join("data");
    let (code, _, err) = run(
        &[
            "serve",
            "--listen",
            &taken,
            "--data-dir",
            other_data.to_str().unwrap(),
        ],
        &[],
    );
    assert_ne!(code, 0);
    assert_eq!(err.matches("cannot listen on").count(), 1, "{err}");
}
