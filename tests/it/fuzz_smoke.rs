//! Stable-toolchain smoke of the fuzz targets (`fuzz/src/lib.rs`), so they cannot rot and the
//! inputs the long libFuzzer runs found stay fixed: every kept input (`fuzz/seeds/TARGET/`, the
//! minimised corpus, and `fuzz/regressions/TARGET/`, inputs that once crashed) is replayed, then
//! each target runs on mutations of those for `EDITIOND_FUZZ_SMOKE_SECS` seconds (default 2).
//! A failing input is printed and written to `target/fuzz-smoke/`; the run's seed is printed
//! and `EDITIOND_FUZZ_SEED` repeats it.

#[path = "../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Tokens the mutator splices in: the grammar of every input the targets read.
const DICTIONARY: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"",
    "\\u0000",
    "\\ud800",
    "null",
    "true",
    "-1",
    "1e999",
    "18446744073709551616",
    "0.5",
    "\"type\"",
    "\"hello\"",
    "\"claim\"",
    "\"register\"",
    "\"ack\"",
    "\"ping\"",
    "\"uaids\"",
    "\"uaid\"",
    "\"secret\"",
    "\"appid\"",
    "\"kick\"",
    "\"updates\"",
    "\"version\"",
    "version=",
    "&",
    "6f2a3c1e-9b4d-4e8f-a1b2-c3d4e5f60718",
    "6F2A3C1E-9B4D-4E8F-A1B2-C3D4E5F60718",
    "[server]",
    "[limits]",
    "[store]",
    "[keys]",
    " = ",
    "\n",
    "\0",
    "listen",
    "public_url",
    "\"https://x/\"",
    "max_frame_bytes",
    "LIMITS__MAX_FRAME_BYTES=",
    "SERVER__LISTEN=",
    "STORE__CLUSTER_URLS=",
    "[[a]]",
    "9223372036854775808",
    "\u{feff}",
    "é",
    // KICK objects and URLs.
    "\"driver\"",
    "\"webhook\"",
    "\"udp\"",
    "\"webpush\"",
    "\"url\"",
    "\"addr\"",
    "\"subscription\"",
    "\"endpoint\"",
    "\"p256dh\"",
    "\"auth\"",
    "https://",
    "http://",
    "[::ffff:",
    "[64:ff9b::",
    "[2002:",
    "10.1.0.1",
    "127.0.0.1",
    "169.254.169.254",
    ":443",
    // Server frames.
    "\"status\"",
    "\"error\"",
    "\"message\"",
    "\"released\"",
    "\"update\"",
    "\"pong\"",
    // Storage bodies and queries.
    "\"id\"",
    "\"payload\"",
    "\"sortindex\"",
    "\"ttl\"",
    "\"modified\"",
    "newer=",
    "older=",
    "ids=",
    "offset=",
    "sort=newest",
    "%2C",
    "application/newlines",
    "1700000000.12",
    // Hawk headers and tokens.
    "Hawk ",
    "id=\"",
    "ts=\"",
    "nonce=\"",
    "mac=\"",
    "hash=\"",
    "ext=\"",
    "=",
    "==",
];

/// xorshift64*: enough randomness for a mutator, and reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    for _ in 0..=rng.below(4) {
        let at = rng.below(input.len() + 1);
        match rng.below(7) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let end = (at + 1 + rng.below(8)).min(input.len());
                input.drain(at.min(end)..end);
            }
            2 => input.insert(at, rng.next() as u8),
            3 | 4 => {
                let token = DICTIONARY[rng.below(DICTIONARY.len())].as_bytes();
                input.splice(at..at, token.iter().copied());
            }
            5 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())];
                let from = rng.below(other.len() + 1);
                let to = (from + rng.below(64)).min(other.len());
                input.splice(at..at, other[from..to].iter().copied());
            }
            _ => {
                // Repeat a slice: deep nesting and long lists.
                let end = (at + 1 + rng.below(4)).min(input.len());
                let piece = input[at.min(end)..end].to_vec();
                for _ in 0..rng.below(200) {
                    input.splice(at..at, piece.iter().copied());
                }
            }
        }
    }
    input.truncate(64 * 1024);
}

fn kept_inputs(target: &str) -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut inputs = Vec::new();
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.map(|e| e.expect("read dir entry").path()).collect();
        paths.sort();
        for path in paths {
            inputs.push(std::fs::read(&path).expect("read kept input"));
        }
    }
    inputs
}

fn run_one(name: &str, target: fn(&[u8]), input: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| target(input))).is_err() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-smoke");
        std::fs::create_dir_all(&dir).expect("create target/fuzz-smoke");
        let path = dir.join(format!("{name}-crash"));
        std::fs::write(&path, input).expect("write failing input");
        panic!(
            "{name} failed on {:?} (written to {}; keep it in fuzz/regressions/{name}/)",
            String::from_utf8_lossy(input),
            path.display()
        );
    }
}

fn smoke(name: &str) {
    let target = targets::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .expect("target exists");
    let corpus = kept_inputs(name);
    assert!(!corpus.is_empty(), "fuzz/seeds/{name}/ has no inputs");
    for input in &corpus {
        run_one(name, target, input);
    }
    let secs = std::env::var("EDITIOND_FUZZ_SMOKE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let seed = std::env::var("EDITIOND_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!(
        "{name}: {} kept inputs passed; mutating with EDITIOND_FUZZ_SEED={seed}",
        corpus.len()
    );
    let mut rng = Rng(seed);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut runs = 0u64;
    while Instant::now() < deadline {
        let mut input = corpus[rng.below(corpus.len())].clone();
        mutate(&mut rng, &mut input, &corpus);
        run_one(name, target, &input);
        runs += 1;
    }
    eprintln!("{name}: {runs} mutated inputs passed");
}

#[test]
fn client_frame() {
    smoke("client_frame");
}

#[test]
fn put_request() {
    smoke("put_request");
}

#[test]
fn endpoint_token() {
    smoke("endpoint_token");
}

#[test]
fn poll_ack_body() {
    smoke("poll_ack_body");
}

#[test]
fn config_load() {
    smoke("config_load");
}

#[test]
fn kick_object() {
    smoke("kick_object");
}

#[test]
fn server_frame() {
    smoke("server_frame");
}

#[test]
fn storage_body() {
    smoke("storage_body");
}

#[test]
fn storage_query() {
    smoke("storage_query");
}

#[test]
fn hawk_header() {
    smoke("hawk_header");
}

#[test]
fn sync_token() {
    smoke("sync_token");
}

#[test]
fn every_target_has_a_smoke_test_and_a_libfuzzer_entry() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let this = std::fs::read_to_string(root.join("tests/it/fuzz_smoke.rs")).expect("read self");
    for (name, _) in targets::TARGETS {
        assert!(
            this.contains(&format!("smoke(\"{name}\")")),
            "{name} has no smoke test"
        );
        assert!(
            root.join(format!("fuzz/fuzz_targets/{name}.rs")).exists(),
            "{name} has no libFuzzer entry"
        );
    }
}
