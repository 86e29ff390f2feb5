//! Replays every conversation in `proto/examples/` against the real server, so the documented
//! protocol and the code cannot drift apart. The format is described in `proto/README.md`.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use crate::common::*;
use serde_json::{Map, Value};

/// Variables bound so far (`$NAME` → value).
struct Vars(HashMap<String, Value>);

impl Vars {
    /// Fills variables into a value to send; unbound `$UAID…`/`$APPID…` become fresh UUID4s.
    fn fill(&mut self, v: &Value) -> Value {
        match v {
            Value::String(s) => self.fill_str(s),
            Value::Array(items) => Value::Array(items.iter().map(|i| self.fill(i)).collect()),
            Value::Object(m) => {
                let mut out = Map::new();
                for (k, v) in m {
                    let key = match self.fill_str(k) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    out.insert(key, self.fill(v));
                }
                Value::Object(out)
            }
            other => other.clone(),
        }
    }

    fn fill_str(&mut self, s: &str) -> Value {
        if let Some(rest) = s.strip_prefix("$SERVER") {
            let base = self.0["$SERVER"].as_str().unwrap().to_owned();
            return Value::String(format!("{base}{rest}"));
        }
        if !s.starts_with('$') {
            return Value::String(s.to_owned());
        }
        if let Some(v) = self.0.get(s) {
            return v.clone();
        }
        assert!(
            s.starts_with("$UAID") || s.starts_with("$APPID"),
            "variable {s} used before the server bound it"
        );
        let fresh = Value::String(new_appid());
        self.0.insert(s.to_owned(), fresh.clone());
        fresh
    }

    /// Checks `actual` against `expected`, binding unbound variables.
    fn check(&mut self, expected: &Value, actual: &Value, at: &str) {
        match (expected, actual) {
            (Value::String(s), _) if s == "*" => {}
            (Value::String(s), _) if s.starts_with('$') && !s.starts_with("$SERVER") => match self.0.get(s) {
                Some(bound) => assert_eq!(bound, actual, "{at}: {s}"),
                None => {
                    self.0.insert(s.clone(), actual.clone());
                }
            },
            (Value::Object(e), Value::Object(a)) => {
                assert_eq!(e.len(), a.len(), "{at}: expected {expected}, got {actual}");
                for (k, ev) in e {
                    let key = self.resolve_key(k, e, a, at);
                    let av = a
                        .get(&key)
                        .unwrap_or_else(|| panic!("{at}: missing {key} in {actual}"));
                    self.check(ev, av, &format!("{at}.{key}"));
                }
            }
            (Value::Array(e), Value::Array(a)) => {
                assert_eq!(e.len(), a.len(), "{at}: expected {expected}, got {actual}");
                for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                    self.check(ev, av, &format!("{at}[{i}]"));
                }
            }
            (Value::String(s), _) => {
                let filled = self.fill_str(s);
                assert_eq!(&filled, actual, "{at}");
            }
            _ => assert_eq!(expected, actual, "{at}"),
        }
    }

    /// An object key in an expected value: literal, bound variable, or the one actual key left.
    fn resolve_key(&mut self, k: &str, e: &Map<String, Value>, a: &Map<String, Value>, at: &str) -> String {
        if !k.starts_with('$') {
            return k.to_owned();
        }
        if let Some(Value::String(bound)) = self.0.get(k) {
            return bound.clone();
        }
        let literal: Vec<&String> = e.keys().filter(|k| !k.starts_with('$')).collect();
        let left: Vec<&String> = a.keys().filter(|k| !literal.contains(k)).collect();
        assert_eq!(left.len(), 1, "{at}: cannot bind {k} among {left:?}");
        self.0.insert(k.to_owned(), Value::String(left[0].clone()));
        left[0].clone()
    }
}

async fn replay(file: &Path) {
    let text = std::fs::read_to_string(file).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert!(doc["description"].as_str().is_some_and(|d| !d.is_empty()));
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let http = reqwest::Client::new();
    let mut vars = Vars(HashMap::from([(
        "$SERVER".to_owned(),
        Value::String(server.url("")),
    )]));
    let mut client = Client::connect(&server).await;
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    for (i, step) in doc["steps"].as_array().unwrap().iter().enumerate() {
        let at = format!("{name} step {i}");
        if let Some(frame) = step.get("client") {
            let frame = vars.fill(frame);
            client.send(frame).await;
        } else if let Some(expected) = step.get("server") {
            let actual = client.recv().await;
            vars.check(expected, &actual, &at);
        } else if let Some(code) = step.get("close") {
            client.expect_close(code.as_u64().unwrap() as u16).await;
        } else if step.get("silence").is_some() {
            client.expect_silence(Duration::from_millis(300)).await;
        } else if step.get("reconnect").is_some() {
            client = Client::connect(&server).await;
        } else if let Some(req) = step.get("http") {
            let req = vars.fill(req);
            let method = reqwest::Method::from_bytes(req["method"].as_str().unwrap().as_bytes()).unwrap();
            let mut builder = http.request(method, req["url"].as_str().unwrap());
            if let Some(headers) = req.get("headers").and_then(Value::as_object) {
                for (k, v) in headers {
                    builder = builder.header(k, v.as_str().unwrap());
                }
            }
            builder = match req.get("body") {
                Some(Value::String(s)) => builder.body(s.clone()),
                Some(body @ Value::Object(_)) => builder.json(body),
                _ => builder,
            };
            let response = builder.send().await.unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap();
            assert_eq!(step["status"].as_u64(), Some(status as u64), "{at}: body {body}");
            if let Some(expected) = step.get("response") {
                let actual: Value =
                    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{at}: {e}: {body}"));
                vars.check(expected, &actual, &at);
            }
        } else {
            panic!("{at}: unknown step {step}");
        }
    }
}

#[tokio::test]
async fn every_documented_example_holds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "examples missing from {}", dir.display());
    for file in files {
        replay(&file).await;
    }
}
