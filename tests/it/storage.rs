//! The Sync 1.5 storage API end to end: the real server on 127.0.0.1, spoken to over HTTP with
//! tokens and Hawk signatures computed by the test's own client (tests/storage_support), never
//! by the server's code. One case per rule of the spec (proto/storage.md), in the spirit of
//! the reference server's integration suite.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use crate::common::Server;
use crate::storage_support::{now_secs, token_for, Sync, Tweak};
use serde_json::{json, Value};

const SECRET: &str = "test-master-secret";

struct Env {
    server: Server,
    _dir: tempfile::TempDir,
}

impl Env {
    async fn start() -> Env {
        Env::start_with(&[]).await
    }

    async fn start_with(extra: &[(&str, &str)]) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let mut env = vec![("EDITIOND_STORAGE__MASTER_SECRET", SECRET)];
        env.extend_from_slice(extra);
        let server = Server::start_with(dir.path(), &env).await;
        Env { server, _dir: dir }
    }

    fn base(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    fn user(&self, uid: u64) -> Sync {
        Sync::new(&self.base(), SECRET, uid)
    }
}

fn bsos(n: usize, payload: &str) -> Value {
    Value::Array(
        (0..n)
            .map(|i| json!({"id": format!("{i:02}"), "payload": payload}))
            .collect(),
    )
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().to_owned())
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn modified_ms(v: &Value) -> u64 {
    (v.as_f64().unwrap() * 1000.0).round() as u64
}

#[tokio::test]
async fn info_views_follow_writes() {
    let env = Env::start().await;
    let c = env.user(1);
    let r1 = c.post("storage/xxx_col1", bsos(3, "xxx")).await;
    assert_eq!(r1.status, 200, "{r1:?}");
    let ts1 = modified_ms(&r1.json()["modified"]);
    let r2 = c.post("storage/xxx_col2", bsos(5, "xxx")).await;
    let ts2 = modified_ms(&r2.json()["modified"]);
    assert!(ts2 > ts1, "timestamps strictly increase per user");
    assert_eq!(r2.ts("x-last-modified"), ts2);
    assert_eq!(
        r2.ts("x-weave-timestamp"),
        ts2,
        "a write's X-Weave-Timestamp is its time"
    );

    let info = c.get("info/collections").await;
    assert_eq!(info.status, 200);
    assert_eq!(info.ts("x-last-modified"), ts2);
    let body = info.json();
    assert_eq!(body.as_object().unwrap().len(), 2);
    assert_eq!(modified_ms(&body["xxx_col1"]), ts1);
    assert_eq!(modified_ms(&body["xxx_col2"]), ts2);
    let re = regex_two_decimals(&info.body);
    assert!(re, "timestamps carry two decimals: {}", info.body);

    let counts = c.get("info/collection_counts").await.json();
    assert_eq!(counts, json!({"xxx_col1": 3, "xxx_col2": 5}));
    let usage = c.get("info/collection_usage").await.json();
    assert!((usage["xxx_col2"].as_f64().unwrap() - 15.0 / 1024.0).abs() < 1e-9);
    let quota = c.get("info/quota").await.json();
    assert!((quota[0].as_f64().unwrap() - 24.0 / 1024.0).abs() < 1e-9);
    assert_eq!(quota[1], Value::Null, "no quota by default");
    let config = c.get("info/configuration").await.json();
    for key in [
        "max_request_bytes",
        "max_post_records",
        "max_post_bytes",
        "max_total_records",
        "max_total_bytes",
        "max_record_payload_bytes",
    ] {
        assert!(config[key].as_u64().is_some(), "{key} in {config}");
    }

    // X-If-Modified-Since on every info view.
    let since = format!("{:.2}", ts2 as f64 / 1000.0);
    let before = format!("{:.2}", (ts2 - 1000) as f64 / 1000.0);
    for view in [
        "info/collections",
        "info/quota",
        "info/collection_usage",
        "info/collection_counts",
    ] {
        let r = c.get_h(view, &[("x-if-modified-since", &since)]).await;
        assert_eq!(r.status, 304, "{view}");
        assert_eq!(r.ts("x-last-modified"), ts2);
        assert_eq!(
            c.get_h(view, &[("x-if-modified-since", &before)]).await.status,
            200,
            "{view}"
        );
    }
    // Another user sees nothing of it.
    assert_eq!(env.user(2).get("info/collections").await.json(), json!({}));
}

fn regex_two_decimals(body: &str) -> bool {
    // Every number after a colon has exactly two decimals.
    body.split(':').skip(1).all(|part| {
        let num: String = part
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        num.split_once('.').is_some_and(|(_, d)| d.len() == 2)
    })
}

#[tokio::test]
async fn collection_reads_filter_sort_and_page() {
    let env = Env::start().await;
    let c = env.user(3);
    c.post("storage/xxx_col2", bsos(5, "xxx")).await;
    assert_eq!(
        c.get("storage/nonexistent").await.json(),
        json!([]),
        "missing collection is empty"
    );
    let all = c.get("storage/xxx_col2").await;
    assert_eq!(all.header("x-weave-records"), Some("5"));
    assert_eq!(sorted(ids(&all.json())), vec!["00", "01", "02", "03", "04"]);
    assert_eq!(
        sorted(ids(&c.get("storage/xxx_col2?ids=01,03,17").await.json())),
        vec!["01", "03"]
    );

    c.delete("storage/xxx_col2").await;
    let ts1 = c
        .put("storage/xxx_col2/128", json!({"payload": "x"}))
        .await
        .ts("x-last-modified");
    let ts2 = c
        .put("storage/xxx_col2/129", json!({"payload": "x"}))
        .await
        .ts("x-last-modified");
    assert!(ts1 < ts2);
    let secs = |ms: u64| format!("{:.2}", ms as f64 / 1000.0);
    let cq = &c;
    let q = |s: String| async move { ids(&cq.get(&s).await.json()) };
    assert_eq!(
        q(format!("storage/xxx_col2?newer={}", secs(ts1))).await,
        vec!["129"]
    );
    assert_eq!(
        q(format!("storage/xxx_col2?newer={}", secs(ts2))).await,
        Vec::<String>::new()
    );
    assert_eq!(
        q(format!("storage/xxx_col2?older={}", secs(ts2))).await,
        vec!["128"]
    );
    assert_eq!(
        q(format!("storage/xxx_col2?older={}", secs(ts1))).await,
        Vec::<String>::new()
    );
    assert_eq!(
        sorted(
            q(format!(
                "storage/xxx_col2?older={}&newer={}",
                secs(ts2 + 1000),
                secs(ts1 - 1000)
            ))
            .await
        ),
        vec!["128", "129"]
    );
    let full = c.get("storage/xxx_col2?full=1").await.json();
    let keys: BTreeSet<&str> = full[0].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["id", "modified", "payload"]));

    // limit + offset for every order, and the orders themselves.
    c.delete("storage/xxx_col2").await;
    let ten: Vec<Value> = (0..10)
        .map(|i| json!({"id": format!("{i:02}"), "payload": "x", "sortindex": i}))
        .collect();
    c.post("storage/xxx_col2", Value::Array(ten)).await;
    for sort in ["index", "newest", "oldest", ""] {
        let url = format!("storage/xxx_col2?sort={sort}");
        let every = ids(&c.get(&url).await.json());
        assert_eq!(every.len(), 10);
        let p1 = c.get(&format!("{url}&limit=2")).await;
        assert_eq!(ids(&p1.json()), every[..2]);
        let next = p1.header("x-weave-next-offset").unwrap().to_owned();
        let p2 = c.get(&format!("{url}&limit=3&offset={next}")).await;
        assert_eq!(ids(&p2.json()), every[2..5]);
        let next = p2.header("x-weave-next-offset").unwrap().to_owned();
        let p3 = c.get(&format!("{url}&offset={next}")).await;
        assert_eq!(ids(&p3.json()), every[5..]);
        assert!(p3.header("x-weave-next-offset").is_none());
        let p4 = c.get(&format!("{url}&limit=10000&offset={next}")).await;
        assert_eq!(ids(&p4.json()), every[5..]);
    }
    c.delete("storage/xxx_col2").await;
    for (id, index) in [("00", -1), ("01", 34), ("02", 12)] {
        c.post(
            "storage/xxx_col2",
            json!([{"id": id, "payload": "x", "sortindex": index}]),
        )
        .await;
    }
    assert_eq!(
        ids(&c.get("storage/xxx_col2?sort=newest").await.json()),
        vec!["02", "01", "00"]
    );
    assert_eq!(
        ids(&c.get("storage/xxx_col2?sort=oldest").await.json()),
        vec!["00", "01", "02"]
    );
    assert_eq!(
        ids(&c.get("storage/xxx_col2?sort=index").await.json()),
        vec!["01", "02", "00"]
    );

    // Bad arguments are 400; unknown ones are ignored; more than 100 ids is 400.
    for arg in [
        "newer=abc",
        "older=abc",
        "limit=abc",
        "limit=-1",
        "offset=garbage",
        "sort=sideways",
    ] {
        assert_eq!(
            c.get(&format!("storage/xxx_col2?{arg}")).await.status,
            400,
            "{arg}"
        );
    }
    assert_eq!(c.get("storage/xxx_col2?blabla=1").await.status, 200);
    let hundred: Vec<String> = (0..100).map(|i| format!("{i:02}")).collect();
    assert_eq!(
        c.get(&format!("storage/xxx_col2?ids={}", hundred.join(",")))
            .await
            .status,
        200
    );
    let too_many: Vec<String> = (0..101).map(|i| format!("{i:02}")).collect();
    assert_eq!(
        c.get(&format!("storage/xxx_col2?ids={}", too_many.join(",")))
            .await
            .status,
        400
    );
    assert_eq!(
        c.delete(&format!("storage/xxx_col2?ids={}", too_many.join(",")))
            .await
            .status,
        400
    );
}

#[tokio::test]
async fn formats_in_and_out() {
    let env = Env::start().await;
    let c = env.user(4);
    c.post("storage/xxx_col2", bsos(5, "xxx")).await;
    let r = c
        .get_h("storage/xxx_col2", &[("accept", "application/newlines")])
        .await;
    assert_eq!(r.header("content-type"), Some("application/newlines"));
    assert!(r.body.ends_with('\n'));
    assert_eq!(r.body.lines().count(), 5);
    let r = c
        .get_h("storage/xxx_col2", &[("accept", "application/json")])
        .await;
    assert!(r.header("content-type").unwrap().starts_with("application/json"));
    let r = c.get_h("storage/xxx_col2", &[("accept", "x/yy")]).await;
    assert_eq!(r.status, 406);

    // application/newlines uploads, payloads with newlines round-trip.
    c.delete("storage/xxx_col2").await;
    let lines = [
        json!({"id": "01", "payload": "hello\nworld"}),
        json!({"id": "02", "payload": "\nmarco\npolo\n"}),
    ];
    let body: Vec<String> = lines.iter().map(Value::to_string).collect();
    let r = c
        .post_raw("storage/xxx_col2", "application/newlines", &body.join("\n"))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let full = c.get("storage/xxx_col2?full=1&sort=index").await.json();
    let mut payloads: Vec<&str> = full
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["payload"].as_str().unwrap())
        .collect();
    payloads.sort();
    assert_eq!(payloads, vec!["\nmarco\npolo\n", "hello\nworld"]);
    let r = c
        .post_raw("storage/xxx_col2", "application/octet-stream", "[]")
        .await;
    assert_eq!(r.status, 415);
    let item = json!({"payload": "p"}).to_string();
    let put = |ct: &'static str| {
        let c = c.clone();
        let item = item.clone();
        async move {
            let path = format!("{}/storage/xxx_col2/TEST", c.root());
            c.send(
                "PUT",
                &path,
                Some((ct, item.into_bytes())),
                &[],
                &Tweak::default(),
            )
            .await
            .status
        }
    };
    assert_eq!(put("application/octet-stream").await, 415);
    assert_eq!(put("text/plain").await, 200, "text/plain is read as JSON");
}

#[tokio::test]
async fn items_put_get_delete_and_preconditions() {
    let env = Env::start().await;
    let c = env.user(5);
    let pld = "*".repeat(500);
    let r = c.put("storage/xxx_col2/12345", json!({"payload": pld})).await;
    assert_eq!(r.status, 200);
    let ts = r.ts("x-last-modified");
    assert_eq!(modified_ms(&r.json()), ts, "PUT answers the new timestamp");
    let item = c.get("storage/xxx_col2/12345").await;
    assert_eq!(item.json()["payload"], json!(pld));
    assert_eq!(item.ts("x-last-modified"), ts);
    let not_found = c.get("storage/xxx_col2/99").await;
    assert_eq!((not_found.status, not_found.body.as_str()), (404, "0"));

    let secs = |ms: u64| format!("{:.2}", ms as f64 / 1000.0);
    assert_eq!(
        c.get_h("storage/xxx_col2/12345", &[("x-if-modified-since", &secs(ts))])
            .await
            .status,
        304
    );
    assert_eq!(
        c.get_h(
            "storage/xxx_col2/12345",
            &[("x-if-modified-since", &secs(ts - 10))]
        )
        .await
        .status,
        200
    );
    let both = [("x-if-modified-since", "1"), ("x-if-unmodified-since", "1")];
    assert_eq!(c.get_h("storage/xxx_col2/12345", &both).await.status, 400);
    assert_eq!(
        c.get_h("storage/xxx_col2", &[("x-if-modified-since", "-3")])
            .await
            .status,
        400
    );

    // X-If-Unmodified-Since in the past: 412 everywhere, with X-Last-Modified.
    let past = secs(ts - 1000);
    let ius = [("x-if-unmodified-since", past.as_str())];
    let changed = json!({"payload": "changed"});
    let r = c.put_h("storage/xxx_col2/12345", changed.clone(), &ius).await;
    assert_eq!(r.status, 412);
    assert_eq!(r.ts("x-last-modified"), ts);
    assert_eq!(c.delete_h("storage/xxx_col2/12345", &ius).await.status, 412);
    assert_eq!(
        c.post_h("storage/xxx_col2", json!([{"id": "12345", "payload": "x"}]), &ius)
            .await
            .status,
        412
    );
    assert_eq!(c.delete_h("storage/xxx_col2?ids=12345", &ius).await.status, 412);
    assert_eq!(c.get_h("storage/xxx_col2/12345", &ius).await.status, 412);
    assert_eq!(c.get_h("storage/xxx_col2", &ius).await.status, 412);
    // A write elsewhere in the collection fails a collection-level precondition.
    let ts2 = c
        .put("storage/xxx_col2/54321", json!({"payload": "y"}))
        .await
        .ts("x-last-modified");
    let at_ts = secs(ts);
    assert_eq!(
        c.delete_h("storage/xxx_col2?ids=12345", &[("x-if-unmodified-since", &at_ts)])
            .await
            .status,
        412
    );
    assert_eq!(
        c.get("storage/xxx_col2/12345").await.json()["payload"],
        json!(pld),
        "nothing changed"
    );
    let at_ts2 = secs(ts2);
    let r = c
        .post_h(
            "storage/xxx_col2",
            json!([{"id": "12345", "payload": "z"}]),
            &[("x-if-unmodified-since", &at_ts2)],
        )
        .await;
    assert_eq!(r.status, 200);

    // Deletes: item (404 when absent), ids, collection, storage.
    let del = c.delete("storage/xxx_col2/12345").await;
    assert_eq!(del.status, 200);
    assert_eq!(c.delete("storage/xxx_col2/12345").await.status, 404);
    assert_eq!(
        c.put_h(
            "storage/xxx_col2/12345",
            json!({"payload": "again"}),
            &[("x-if-unmodified-since", "0")]
        )
        .await
        .status,
        200
    );
    assert!(c.get("info/collections").await.ts("x-last-modified") > ts2);
    c.post("storage/xxx_col3", bsos(3, "x")).await;
    assert_eq!(c.delete("storage/xxx_col3?ids=00,02").await.status, 200);
    assert_eq!(ids(&c.get("storage/xxx_col3").await.json()), vec!["01"]);
    assert_eq!(c.delete("storage").await.status, 200);
    assert_eq!(c.get("info/collections").await.json(), json!({}));
    assert_eq!(
        c.delete("storage/xxx_col2").await.status,
        200,
        "deleting nothing is fine"
    );
    c.put("storage/meta/global", json!({"payload": "blob"})).await;
    assert_eq!(c.delete(&c.root()).await.status, 200);
    assert_eq!(c.get("storage/meta/global").await.status, 404);

    // A client's "modified" is ignored; meta/global reads back with two decimals.
    let r = c
        .put("storage/meta/global", json!({"payload": "blob", "modified": 12}))
        .await;
    let item = c.get("storage/meta/global").await;
    assert_eq!(modified_ms(&item.json()["modified"]), r.ts("x-weave-timestamp"));
    assert!(item
        .body
        .contains(&format!("\"modified\":{}", secs(r.ts("x-weave-timestamp")))));
}

#[tokio::test]
async fn invalid_records_get_the_sync_codes() {
    let env = Env::start().await;
    let c = env.user(6);
    for bad in [
        json!("notabso"),
        json!(42),
        json!({"id": ["01", "02"], "payload": {"3": "4"}}),
    ] {
        let r = c.put("storage/xxx_col2/invalid", bad.clone()).await;
        assert_eq!((r.status, r.body.as_str()), (400, "8"), "{bad}");
    }
    for bad in [
        json!("notalist"),
        json!(42),
        json!([{"id": "01", "payload": "GOOD"}, "BAD"]),
    ] {
        let r = c.post("storage/xxx_col2", bad.clone()).await;
        assert_eq!((r.status, r.body.as_str()), (400, "8"), "{bad}");
    }
    let r = c
        .post(
            "storage/xxx_col2",
            json!([{"id": "01", "payload": "GOOD"}, {"id": "02", "invalid": "ya"}]),
        )
        .await;
    assert_eq!(r.json()["success"], json!(["01"]));
    assert_eq!(r.json()["failed"].as_object().unwrap().len(), 1);
    for bad in [
        json!({"id": "A\nB", "payload": "t"}),
        json!({"id": "", "payload": "t"}),
        json!({"id": "X".repeat(65), "payload": "t"}),
        json!({"id": "T", "payload": "t", "sortindex": "xxx"}),
        json!({"id": "T", "payload": "t", "sortindex": 1_000_000_000}),
        json!({"id": "T", "payload": 42}),
        json!({"id": "T", "payload": "t", "ttl": "eh?"}),
        json!({"id": "T", "payload": "t", "ttl": -1}),
        json!({"id": "T", "unexpected": "spanish-inquisition"}),
    ] {
        let r = c.post("storage/xxx_col2", json!([bad.clone()])).await;
        let body = r.json();
        assert!(
            body["success"] == json!([]) && !body["failed"].as_object().unwrap().is_empty(),
            "{bad}: {body}"
        );
    }
    let r = c
        .put("storage/xxx_col2/TEST", json!({"payload": "t", "sortindex": -42}))
        .await;
    assert_eq!(r.status, 200, "sortindex may be negative");
    let r = c
        .put("storage/xxx_col2/TEST", json!({"payload": "t", "ttl": null}))
        .await;
    assert_eq!(r.status, 200, "a null ttl is the default");
    // Known-bad crypto/keys uploads.
    let bad_keys = json!({"id": "keys", "payload": json!({"ciphertext": "x", "IV": "AAAAAAAAAAAAAAAAAAAAAA=="}).to_string()});
    assert_eq!(c.put("storage/crypto/keys", bad_keys.clone()).await.status, 400);
    assert_eq!(
        c.post("storage/crypto", json!([bad_keys.clone()])).await.status,
        400
    );
    assert_eq!(c.put("storage/xxx_col2/keys", bad_keys).await.status, 200);
    let r = c.get("storage/bad%20name");
    assert_eq!(r.await.status, 400, "invalid collection name");
}

#[tokio::test]
async fn post_limits_fail_records_or_requests() {
    let env = Env::start().await;
    let c = env.user(7);
    let config = c.get("info/configuration").await.json();
    let max_count = config["max_post_records"].as_u64().unwrap() as usize;
    let max_bytes = config["max_post_bytes"].as_u64().unwrap() as usize;
    let r = c.post("storage/xxx_col2", bsos(max_count + 5, "X")).await.json();
    assert_eq!(r["success"].as_array().unwrap().len(), max_count);
    let failed = r["failed"].as_object().unwrap();
    assert_eq!(failed.len(), 5);
    assert!(failed.values().all(|v| v == "retry bso"));
    let batch =
        json!([{"id": "little", "payload": "XXX"}, {"id": "big", "payload": "X".repeat(max_bytes - 2)}]);
    let r = c.post("storage/xxx_col2?batch=true", batch).await.json();
    assert_eq!(r["success"], json!(["little"]));
    assert_eq!(r["failed"]["big"], json!("retry bytes"));
    let total = (config["max_total_bytes"].as_u64().unwrap() + 1).to_string();
    let r = c
        .post_h(
            "storage/xxx_col2?batch=true",
            json!([]),
            &[("x-weave-total-bytes", &total)],
        )
        .await;
    assert_eq!((r.status, r.body.as_str()), (400, "17"));
    let r = c
        .post_h(
            "storage/xxx_col2",
            json!([]),
            &[("x-weave-records", &(max_count + 1).to_string())],
        )
        .await;
    assert_eq!((r.status, r.body.as_str()), (400, "17"));
    // A body over max_request_bytes is 413.
    let huge = "X".repeat(config["max_request_bytes"].as_u64().unwrap() as usize + 10);
    let r = c.post_raw("storage/xxx_col2", "application/json", &huge).await;
    assert_eq!(r.status, 413);
    assert_eq!(
        r.header("x-weave-limit"),
        Some("max_request_bytes=2101248"),
        "413 names the limit"
    );
}

#[tokio::test]
async fn batches_stage_then_commit_once() {
    let env = Env::start().await;
    let c = env.user(8);
    c.post(
        "storage/xxx_col2",
        json!([{"id": "12", "payload": "elegance"}, {"id": "13", "payload": "slovenly", "sortindex": 17}]),
    )
    .await;
    let orig = c.get("storage/xxx_col2/12").await.ts("x-last-modified");
    let r = c
        .post(
            "storage/xxx_col2?batch=true",
            json!([{"id": "a", "payload": "internal"}, {"id": "b", "ttl": 100}]),
        )
        .await;
    assert_eq!(r.status, 202);
    assert_eq!(
        r.ts("x-last-modified"),
        orig,
        "staging does not modify the collection"
    );
    let batch = r.json()["batch"].as_str().unwrap().to_owned();
    let listed = c.get("storage/xxx_col2").await;
    assert_eq!(sorted(ids(&listed.json())), vec!["12", "13"]);
    assert_eq!(listed.ts("x-last-modified"), orig);
    let r = c
        .post(
            &format!("storage/xxx_col2?batch={batch}"),
            json!([{"id": "13", "payload": "portnoy"}]),
        )
        .await;
    assert_eq!(r.status, 202);
    assert_eq!(r.json()["batch"], json!(batch));
    // Another collection or user cannot use it.
    assert_eq!(
        c.post(&format!("storage/xxx_col1?batch={batch}"), json!([]))
            .await
            .status,
        400
    );
    let other = env.user(9);
    assert_eq!(
        other
            .post(&format!("storage/xxx_col2?batch={batch}&commit=true"), json!([]))
            .await
            .status,
        400
    );
    let r = c
        .post(
            &format!("storage/xxx_col2?batch={batch}&commit=true"),
            json!([{"id": "14", "payload": "itsybitsy"}]),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let committed = modified_ms(&r.json()["modified"]);
    assert_eq!(r.json()["success"], json!(["14"]));
    assert_eq!(r.ts("x-last-modified"), committed);
    let info = c.get("info/collections").await;
    assert_eq!(info.ts("x-last-modified"), committed);
    let full = c.get("storage/xxx_col2?full=1").await.json();
    let by_id = |id: &str| {
        full.as_array()
            .unwrap()
            .iter()
            .find(|b| b["id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_id("13")["payload"], json!("portnoy"));
    assert_eq!(by_id("13")["sortindex"], json!(17), "untouched fields are kept");
    assert_eq!(modified_ms(&by_id("13")["modified"]), committed);
    assert_eq!(
        by_id("b")["payload"],
        json!(""),
        "a new record from a ttl alone has an empty payload"
    );
    assert_eq!(modified_ms(&by_id("12")["modified"]), orig);
    assert_eq!(full.as_array().unwrap().len(), 5);
    // A committed batch is gone.
    assert_eq!(
        c.post(&format!("storage/xxx_col2?batch={batch}&commit=true"), json!([]))
            .await
            .status,
        400
    );
    // Invalid ids, commit without batch, immediate commit.
    assert_eq!(
        c.post("storage/xxx_col2?batch=sammich", json!([])).await.status,
        400
    );
    assert_eq!(
        c.post("storage/xxx_col2?commit=true", json!([])).await.status,
        400
    );
    let r = c
        .post(
            "storage/xxx_col2?batch=true&commit=true",
            json!([{"id": "z", "payload": "now"}]),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.json().get("batch").is_none());
    // Empty commits: JSON "[]" and newlines "" are fine; other bodies are 400.
    for (ct, body, status) in [
        ("application/json", "[]", 200),
        ("application/json", "{}", 400),
        ("application/json", "", 400),
        ("application/newlines", "", 200),
        ("application/newlines", "\n", 400),
        ("application/newlines", "{}", 400),
        ("application/newlines", "[]", 400),
    ] {
        let staged = c.post("storage/xxx_col?batch=true", bsos(5, "X")).await.json();
        let id = staged["batch"].as_str().unwrap();
        let r = c
            .post_raw(&format!("storage/xxx_col?commit=true&batch={id}"), ct, body)
            .await;
        assert_eq!(r.status, status, "{ct} {body:?}");
    }
}

#[tokio::test]
async fn batches_expire_after_their_lifetime() {
    let env = Env::start_with(&[("EDITIOND_STORAGE__BATCH_TTL_SECS", "1")]).await;
    let c = env.user(10);
    let r = c
        .post(
            "storage/xxx_col2?batch=true",
            json!([{"id": "a", "payload": "x"}]),
        )
        .await;
    let batch = r.json()["batch"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = c
        .post(&format!("storage/xxx_col2?batch={batch}&commit=true"), json!([]))
        .await;
    assert_eq!(r.status, 400, "an expired batch is unknown");
    assert_eq!(
        c.get("storage/xxx_col2").await.json(),
        json!([]),
        "and nothing of it was applied"
    );
}

#[tokio::test]
async fn records_expire_by_ttl_and_stay_gone() {
    let env = Env::start().await;
    let c = env.user(11);
    c.put("storage/xxx_col2/TEST", json!({"payload": "XYZ", "ttl": 0}))
        .await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(c.get("storage/xxx_col2/TEST").await.status, 404);
    assert_eq!(c.get("storage/xxx_col2").await.json(), json!([]));
    assert_eq!(
        c.put("storage/xxx_col2/TEST", json!({"payload": "XYZ", "ttl": 42}))
            .await
            .status,
        200
    );

    c.put("storage/xxx_col2/T1", json!({"payload": "x", "ttl": 1}))
        .await;
    c.put("storage/xxx_col2/T2", json!({"payload": "x", "ttl": 1}))
        .await;
    c.put("storage/xxx_col2/T2", json!({"ttl": 10})).await;
    c.put("storage/xxx_col2/T3", json!({"ttl": 10})).await;
    c.put("storage/xxx_col2/T1", json!({"sortindex": 3})).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let full = c.get("storage/xxx_col2?full=1&sort=oldest").await.json();
    let got: Vec<(&str, &str)> = full
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["id"].as_str().unwrap(), b["payload"].as_str().unwrap()))
        .collect();
    assert_eq!(
        sorted(got.iter().map(|g| g.0.to_owned()).collect()),
        vec!["T2", "T3", "TEST"]
    );
    assert!(got.contains(&("T2", "x")) && got.contains(&("T3", "")));
    assert_eq!(c.get("info/collection_counts").await.json()["xxx_col2"], json!(3));
}

#[tokio::test]
async fn concurrent_writers_with_if_unmodified_since_have_one_winner() {
    let env = Env::start().await;
    let c = env.user(12);
    c.put("storage/clients/me", json!({"payload": "0"})).await;
    for round in 0..5 {
        let seen = c
            .get("storage/clients")
            .await
            .header("x-last-modified")
            .unwrap()
            .to_owned();
        let writers = (0..8).map(|i| {
            let c = c.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let body = json!([{"id": "me", "payload": format!("{round}-{i}")}]);
                c.post_h("storage/clients", body, &[("x-if-unmodified-since", &seen)])
                    .await
                    .status
            })
        });
        let statuses: Vec<u16> = futures_util::future::join_all(writers)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");
        assert_eq!(statuses.iter().filter(|s| **s == 412).count(), 7, "{statuses:?}");
    }
    // Without preconditions every one of them lands, serialised, none with a 5xx.
    let writers = (0..16).map(|i| {
        let c = c.clone();
        tokio::spawn(async move {
            c.put(&format!("storage/tabs/t{i}"), json!({"payload": "x"}))
                .await
        })
    });
    let mut stamps = HashSet::new();
    for r in futures_util::future::join_all(writers).await {
        let r = r.unwrap();
        assert_eq!(r.status, 200);
        assert!(
            stamps.insert(r.ts("x-last-modified")),
            "every write has its own timestamp"
        );
    }
    assert_eq!(c.get("storage/tabs").await.json().as_array().unwrap().len(), 16);
}

#[tokio::test]
async fn paging_never_skips_or_repeats_while_others_write() {
    let env = Env::start().await;
    let c = env.user(13);
    let start: Vec<Value> = (0..30)
        .map(|i| json!({"id": format!("r{i:02}"), "payload": "v1", "sortindex": i % 7}))
        .collect();
    c.post("storage/history", Value::Array(start)).await;
    for sort in ["newest", "oldest", "index", ""] {
        // Reset the collection to its 30 first records.
        c.delete("storage/history").await;
        let start: Vec<Value> = (0..30)
            .map(|i| json!({"id": format!("r{i:02}"), "payload": "v1", "sortindex": i % 7}))
            .collect();
        c.post("storage/history", Value::Array(start)).await;
        let url = format!("storage/history?sort={sort}&limit=4");
        let first = c.get(&url).await;
        let bound = first.ts("x-last-modified");
        let mut seen: Vec<String> = ids(&first.json());
        let mut offset = first.header("x-weave-next-offset").map(str::to_owned);
        let (mut updated, mut deleted): (HashSet<String>, HashSet<String>) = Default::default();
        let mut step = 0;
        while let Some(o) = offset {
            // Between pages: a new record, an update and a delete of records not yet seen.
            let unseen: Vec<String> = (0..30)
                .map(|i| format!("r{i:02}"))
                .filter(|id| !seen.contains(id) && !updated.contains(id) && !deleted.contains(id))
                .collect();
            c.put(&format!("storage/history/new{step}"), json!({"payload": "n"}))
                .await;
            if unseen.len() >= 2 {
                let (first, last) = (&unseen[0], &unseen[unseen.len() - 1]);
                c.put(
                    &format!("storage/history/{first}"),
                    json!({"payload": "v2", "sortindex": 99}),
                )
                .await;
                updated.insert(first.clone());
                c.delete(&format!("storage/history/{last}")).await;
                deleted.insert(last.clone());
            }
            step += 1;
            let page = c.get(&format!("{url}&offset={o}")).await;
            assert_eq!(page.status, 200);
            seen.extend(ids(&page.json()));
            offset = page.header("x-weave-next-offset").map(str::to_owned);
        }
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "sort={sort}: no record twice: {seen:?}");
        for i in 0..30 {
            let id = format!("r{i:02}");
            if !updated.contains(&id) && !deleted.contains(&id) {
                assert!(unique.contains(&id), "sort={sort}: {id} skipped");
            }
        }
        assert!(
            seen.iter().all(|id| id.starts_with('r')),
            "sort={sort}: nothing newer than the first page"
        );
        // The next incremental sync brings what changed meanwhile.
        let since = format!("{:.2}", bound as f64 / 1000.0);
        let newer = ids(&c.get(&format!("storage/history?newer={since}")).await.json());
        assert!(
            !updated.is_empty() && !deleted.is_empty(),
            "sort={sort}: the test changed records"
        );
        assert!(newer.iter().any(|id| id.starts_with("new")));
        assert!(
            updated.iter().all(|id| newer.contains(id)),
            "sort={sort}: updates come with newer="
        );
        assert!(
            deleted.iter().all(|id| !seen.contains(id) && !newer.contains(id)),
            "sort={sort}: deleted stay gone"
        );
    }
}

#[tokio::test]
async fn hawk_and_token_failures_are_401() {
    let env = Env::start().await;
    let c = env.user(14);
    let path = format!("{}/storage/xxx_col2", c.root());
    let send = |tweak: Tweak| {
        let c = c.clone();
        let path = path.clone();
        async move { c.send("GET", &path, None, &[], &tweak).await }
    };
    assert_eq!(send(Tweak::default()).await.status, 200);
    let r = send(Tweak {
        no_auth: true,
        ..Tweak::default()
    })
    .await;
    assert_eq!((r.status, r.body.as_str()), (401, "0"));
    assert_eq!(
        send(Tweak {
            wrong_mac: true,
            ..Tweak::default()
        })
        .await
        .status,
        401
    );
    assert_eq!(
        send(Tweak {
            ts_offset: -3600,
            ..Tweak::default()
        })
        .await
        .status,
        401,
        "skew"
    );
    let once = Tweak {
        nonce: Some("same-nonce".into()),
        ..Tweak::default()
    };
    assert_eq!(send(once.clone()).await.status, 200);
    assert_eq!(send(once).await.status, 401, "a replayed nonce is refused");
    let body = Some(("application/json", b"[]".to_vec()));
    let r = c
        .send(
            "POST",
            &path,
            body,
            &[],
            &Tweak {
                wrong_hash: true,
                ..Tweak::default()
            },
        )
        .await;
    assert_eq!(r.status, 401, "payload hash must match the body");
    // Another user's path, another secret, another node.
    let r = c
        .send("GET", "/1.5/15/storage/xxx_col2", None, &[], &Tweak::default())
        .await;
    assert_eq!(r.status, 401);
    let forged = Sync::new(&env.base(), "another-secret", 14);
    assert_eq!(forged.get("storage/xxx_col2").await.status, 401);
    let (token, key) = token_for(SECRET, 14, "http://elsewhere.example", now_secs() + 60.0);
    let elsewhere = Sync::with_token(&env.base(), 14, token, key);
    assert_eq!(elsewhere.get("storage/xxx_col2").await.status, 401);
    // An expired token may still read info/collections, nothing else.
    c.post("storage/xxx_col1", bsos(3, "xxx")).await;
    let (token, key) = token_for(SECRET, 14, &env.base(), now_secs() - 60.0);
    let expired = Sync::with_token(&env.base(), 14, token, key);
    assert_eq!(expired.get("storage/xxx_col1").await.status, 401);
    assert_eq!(expired.post("storage/xxx_col1", bsos(1, "a")).await.status, 401);
    let info = expired.get("info/collections").await;
    assert_eq!(info.status, 200);
    assert!(info.json().get("xxx_col1").is_some());
}

#[tokio::test]
async fn protocol_edges() {
    let env = Env::start().await;
    let c = env.user(16);
    let r = c.get("nonexistent/url").await;
    assert_eq!(
        (r.status, r.body.as_str(), r.header("content-type")),
        (404, "0", Some("application/json"))
    );
    let path = format!("{}/storage/xxx_col1", c.root());
    assert_eq!(
        c.send("PATCH", &path, None, &[], &Tweak::default()).await.status,
        405
    );
    let http = reqwest::Client::new();
    let hb = http
        .get(format!("{}/__heartbeat__", env.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(hb.status(), 200);
    let lb = http
        .get(format!("{}/__lbheartbeat__", env.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(lb.status(), 200);
    c.put("storage/xxx_col1/m", json!({"payload": "m"})).await;
    let metrics = env.server.metrics(&http).await;
    assert!(
        metrics.contains("editiond_storage_requests_total{status=\"405\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("editiond_storage_commit_seconds_count 1"),
        "{metrics}"
    );
    let preflight = http
        .request(
            reqwest::Method::OPTIONS,
            format!("{}{}/__heartbeat__", env.base(), c.root()),
        )
        .header("origin", "localhost")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "Content-Type")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 200);
    assert_eq!(preflight.headers()["access-control-max-age"], "555");
    assert_eq!(preflight.headers()["access-control-allow-origin"], "localhost");
    // Strict newer/older on POSTed groups.
    let first = c
        .post(
            "storage/xxx_meh",
            json!([{"id": "01", "payload": "x"}, {"id": "02", "payload": "x"}]),
        )
        .await;
    let second = c
        .post(
            "storage/xxx_meh",
            json!([{"id": "03", "payload": "x"}, {"id": "04", "payload": "x"}]),
        )
        .await;
    let t1 = first.header("x-last-modified").unwrap().to_owned();
    let t2 = second.header("x-last-modified").unwrap().to_owned();
    assert_eq!(
        sorted(ids(&c.get(&format!("storage/xxx_meh?newer={t1}")).await.json())),
        vec!["03", "04"]
    );
    assert_eq!(
        sorted(ids(&c.get(&format!("storage/xxx_meh?older={t2}")).await.json())),
        vec!["01", "02"]
    );
    // Percent-encoded ids.
    assert_eq!(c.delete("storage/xxx_meh?ids=01%2C02").await.status, 200);
    assert_eq!(
        sorted(ids(&c.get("storage/xxx_meh").await.json())),
        vec!["03", "04"]
    );
}

#[tokio::test]
async fn writes_survive_a_kill() {
    let mut env = Env::start().await;
    let c = env.user(17);
    let r = c.post("storage/bookmarks", bsos(20, "durable")).await;
    assert_eq!(r.status, 200);
    env.server.kill();
    env.server.restart().await;
    let full = c.get("storage/bookmarks?full=1").await.json();
    assert_eq!(full.as_array().unwrap().len(), 20);
    assert!(full.as_array().unwrap().iter().all(|b| b["payload"] == "durable"));
    let later = c.put("storage/bookmarks/00", json!({"payload": "after"})).await;
    assert!(
        later.ts("x-last-modified") > r.ts("x-last-modified"),
        "timestamps keep increasing"
    );
}

#[tokio::test]
async fn quota_end_of_life_and_configuration() {
    let env = Env::start_with(&[
        ("EDITIOND_STORAGE__QUOTA_BYTES", "1024"),
        ("EDITIOND_STORAGE__EOL", "soft"),
        ("EDITIOND_STORAGE__EOL_MESSAGE", "moving"),
    ])
    .await;
    let c = env.user(18);
    let r = c.put("storage/xxx/a", json!({"payload": "x".repeat(1000)})).await;
    assert_eq!(r.status, 200);
    let remaining: f64 = r.header("x-weave-quota-remaining").unwrap().parse().unwrap();
    assert!((remaining - 24.0 / 1024.0).abs() < 0.01);
    let alert: Value = serde_json::from_str(r.header("x-weave-alert").unwrap()).unwrap();
    assert_eq!(alert["code"], "soft-eol");
    let r = c.put("storage/xxx/b", json!({"payload": "x".repeat(100)})).await;
    assert_eq!((r.status, r.body.as_str()), (403, "14"));
    assert!((c.get("info/quota").await.json()[1].as_f64().unwrap() - 1.0).abs() < 1e-9);

    let hard = Env::start_with(&[("EDITIOND_STORAGE__EOL", "hard")]).await;
    let r = hard.user(1).get("info/collections").await;
    assert_eq!(r.status, 513);
    assert!(r.header("x-weave-alert").unwrap().contains("hard-eol"));
}

#[tokio::test]
async fn redis_backend_needs_storage_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_editiond"))
        .args(["config", "--data-dir"])
        .arg(dir.path())
        .env("EDITIOND_STORE__BACKEND", "redis")
        .env("EDITIOND_STORAGE__MASTER_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("storage.pinned"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_editiond"))
        .args(["config"])
        .env("EDITIOND_STORE__BACKEND", "redis")
        .env("EDITIOND_STORAGE__MASTER_SECRET", SECRET)
        .env("EDITIOND_STORAGE__PINNED", "true")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(SECRET),
        "the secret is never printed"
    );
}

#[tokio::test]
async fn token_subcommand_mints_what_the_server_accepts() {
    let env = Env::start().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_editiond"))
        .args(["token", "--uid", "19", "--public-url", &env.base()])
        .env("EDITIOND_STORAGE__MASTER_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let minted: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(minted["api_endpoint"], json!(format!("{}/1.5/19", env.base())));
    let c = Sync::with_token(
        &env.base(),
        19,
        minted["id"].as_str().unwrap().to_owned(),
        minted["key"].as_str().unwrap().to_owned(),
    );
    assert_eq!(c.put("storage/xxx/a", json!({"payload": "p"})).await.status, 200);
}

/// The instant-sync hooks, as the push side wires them: a watch token proves its uid (or is
/// refused), and every successful write reports (uid, collection, new last-modified in ms).
#[tokio::test]
async fn watch_hooks_verify_tokens_and_observe_writes() {
    use std::sync::{Arc, Mutex};

    use editiond::storage::store::MemoryStorage;
    use editiond::storage::{Storage, StorageConfig, WatchTokenError};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let config = StorageConfig {
        master_secret: SECRET.into(),
        ..StorageConfig::default()
    };
    let storage = Storage::new(config, &base, Arc::new(MemoryStorage::memory()));
    let seen: Arc<Mutex<Vec<(u64, String, u64)>>> = Arc::default();
    let log = seen.clone();
    storage.set_observer(Arc::new(move |uid, collection: &str, ms| {
        log.lock().unwrap().push((uid, collection.to_owned(), ms));
    }));
    let app: axum::Router = editiond::storage::routes(Some(storage.clone()));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let (token, _) = token_for(SECRET, 21, &base, now_secs() + 60.0);
    assert_eq!(storage.verify_watch_token(&token), Ok(21));
    let (other, _) = token_for("another-secret", 21, &base, now_secs() + 60.0);
    assert!(matches!(
        storage.verify_watch_token(&other),
        Err(WatchTokenError::Token(_))
    ));
    let (expired, _) = token_for(SECRET, 21, &base, now_secs() - 1.0);
    assert!(matches!(
        storage.verify_watch_token(&expired),
        Err(WatchTokenError::Token(_))
    ));
    let (wrong_node, _) = token_for(SECRET, 21, "http://elsewhere", now_secs() + 60.0);
    assert_eq!(
        storage.verify_watch_token(&wrong_node),
        Err(WatchTokenError::WrongNode)
    );

    let c = Sync::new(&base, SECRET, 21);
    let put = c.put("storage/bookmarks/a", json!({"payload": "x"})).await;
    let staged = c
        .post("storage/tabs?batch=true", json!([{"id": "t", "payload": "y"}]))
        .await;
    assert!(seen.lock().unwrap().len() == 1, "staging a batch is not a write");
    let batch = staged.json()["batch"].as_str().unwrap().to_owned();
    let commit = c
        .post(&format!("storage/tabs?batch={batch}&commit=true"), json!([]))
        .await;
    assert_eq!(c.get("storage/bookmarks").await.status, 200);
    let log = seen.lock().unwrap().clone();
    assert_eq!(
        log,
        vec![
            (21, "bookmarks".to_owned(), put.ts("x-last-modified")),
            (21, "tabs".to_owned(), commit.ts("x-last-modified")),
        ]
    );
}

/// `DELETE storage?keep=meta/global` (proto/storage.md): every collection, record and batch
/// goes but the sync metadata, at a new timestamp, under X-If-Unmodified-Since, durably.
#[tokio::test]
async fn delete_storage_can_keep_meta_global() {
    let mut env = Env::start().await;
    let c = env.user(22);
    let global = c
        .put("storage/meta/global", json!({"payload": "{\"syncID\":\"s\"}"}))
        .await;
    assert_eq!(global.status, 200);
    let meta_ts = global.ts("x-last-modified");
    c.put("storage/crypto/keys", json!({"payload": "keys"})).await;
    c.post("storage/bookmarks", bsos(3, "b")).await;
    let staged = c
        .post("storage/tabs?batch=true", json!([{"id": "t", "payload": "x"}]))
        .await;
    let batch = staged.json()["batch"].as_str().unwrap().to_owned();
    let last = c.get("info/collections").await.ts("x-last-modified");
    let secs = |ms: u64| format!("{:.2}", ms as f64 / 1000.0);

    // Refusals change nothing: a stale precondition, another `keep`, `keep` on the user URL.
    let r = c
        .delete_h(
            "storage?keep=meta/global",
            &[("x-if-unmodified-since", &secs(last - 10))],
        )
        .await;
    assert_eq!(r.status, 412, "{r:?}");
    assert_eq!(r.ts("x-last-modified"), last);
    for path in [
        "storage?keep=meta",
        "storage?keep=crypto/keys",
        &format!("{}?keep=meta/global", c.root()),
    ] {
        let r = c.delete(path).await;
        assert_eq!((r.status, r.body.as_str()), (400, "8"), "{path}");
    }
    assert_eq!(
        c.get("info/collections").await.json().as_object().unwrap().len(),
        3,
        "meta, crypto, bookmarks (a staged batch makes no collection)"
    );

    let r = c
        .delete_h(
            "storage?keep=meta%2Fglobal",
            &[("x-if-unmodified-since", &secs(last))],
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let ts = modified_ms(&r.json()["modified"]);
    assert!(ts > last, "the user's time moves");
    assert_eq!(r.ts("x-last-modified"), ts);
    let info = c.get("info/collections").await;
    assert_eq!(info.ts("x-last-modified"), ts);
    let collections = info.json();
    assert_eq!(collections.as_object().unwrap().len(), 1, "{collections}");
    assert_eq!(
        modified_ms(&collections["meta"]),
        meta_ts,
        "meta held only global: its time stays, so other devices see nothing new there"
    );
    let kept = c.get("storage/meta/global").await;
    assert_eq!(kept.json()["payload"], json!("{\"syncID\":\"s\"}"));
    assert_eq!(kept.ts("x-last-modified"), meta_ts);
    assert_eq!(c.get("storage/crypto/keys").await.status, 404);
    assert_eq!(c.get("storage/bookmarks").await.json(), json!([]));
    let commit = c
        .post(&format!("storage/tabs?batch={batch}&commit=true"), json!([]))
        .await;
    assert_eq!(commit.status, 400, "batches go too");

    // Other records of meta go, and then meta's time moves with them.
    c.put("storage/meta/other", json!({"payload": "o"})).await;
    let r = c.delete("storage?keep=meta/global").await;
    let ts2 = r.ts("x-last-modified");
    assert!(ts2 > ts);
    assert_eq!(ids(&c.get("storage/meta").await.json()), vec!["global"]);
    assert_eq!(modified_ms(&c.get("info/collections").await.json()["meta"]), ts2);
    // Without meta/global there is nothing to keep.
    c.delete("storage/meta/global").await;
    c.put("storage/meta/other", json!({"payload": "o"})).await;
    assert_eq!(c.delete("storage?keep=meta/global").await.status, 200);
    assert_eq!(c.get("info/collections").await.json(), json!({}));

    // Durable before the answer: a kill right after it loses nothing and revives nothing.
    c.put("storage/meta/global", json!({"payload": "g"})).await;
    c.post("storage/history", bsos(2, "h")).await;
    let r = c.delete("storage?keep=meta/global").await;
    assert_eq!(r.status, 200);
    env.server.kill();
    env.server.restart().await;
    let after = c.get("info/collections").await;
    assert_eq!(
        after.json().as_object().unwrap().keys().collect::<Vec<_>>(),
        vec!["meta"]
    );
    assert_eq!(after.ts("x-last-modified"), r.ts("x-last-modified"));
    assert_eq!(c.get("storage/meta/global").await.json()["payload"], "g");
    // Another user never notices.
    assert_eq!(env.user(23).get("info/collections").await.json(), json!({}));
}

/// A storage request held in flight: its head is sent with `Expect: 100-continue` and no body,
/// and the server's `100 Continue` shows the handler is waiting for that body, so the request
/// is counted as load until [`release`].
async fn hold(addr: std::net::SocketAddr, uid: u64) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /1.5/{uid}/storage/held HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let answer = read_head(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 100"), "{answer}");
    s
}

/// Sends the held request's body; returns its answer's status line.
async fn release(mut s: tokio::net::TcpStream) -> String {
    use tokio::io::AsyncWriteExt;
    s.write_all(b"[]").await.unwrap();
    read_head(&mut s).await.lines().next().unwrap().to_owned()
}

/// Reads one answer's head (up to the blank line).
async fn read_head(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        // A guard against a hang, not a timing assertion.
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut byte))
            .await
            .expect("an answer")
            .unwrap();
        assert_eq!(
            n,
            1,
            "connection closed after {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// Load (requests in flight) past `backoff_in_flight` adds X-Weave-Backoff to answers; past
/// `shed_in_flight` requests get 503 with Retry-After and X-Weave-Backoff; heartbeats neither.
#[tokio::test]
async fn load_adds_backoff_then_sheds() {
    let quiet = Env::start().await;
    let r = quiet.user(24).get("info/collections").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-weave-backoff"), None, "the defaults stay quiet");

    let env = Env::start_with(&[
        ("EDITIOND_STORAGE__BACKOFF_IN_FLIGHT", "1"),
        ("EDITIOND_STORAGE__SHED_IN_FLIGHT", "2"),
        ("EDITIOND_STORAGE__BACKOFF_SECS", "7"),
    ])
    .await;
    let c = env.user(24);
    let http = reqwest::Client::new();
    let alone = c.put("storage/tabs/a", json!({"payload": "x"})).await;
    assert_eq!(alone.status, 200);
    assert_eq!(alone.header("x-weave-backoff"), None, "one request is no load");

    let first = hold(env.server.addr, 24).await;
    let busy = c.put("storage/tabs/b", json!({"payload": "y"})).await;
    assert_eq!(busy.status, 200, "{busy:?}");
    assert_eq!(busy.header("x-weave-backoff"), Some("7"));
    assert_eq!(busy.header("retry-after"), None, "served: no Retry-After");
    assert_eq!(c.get("storage/tabs/b").await.json()["payload"], "y");

    let second = hold(env.server.addr, 25).await;
    let shed = c.get("storage/tabs").await;
    assert_eq!((shed.status, shed.body.as_str()), (503, "0"), "{shed:?}");
    assert_eq!(shed.header("retry-after"), Some("7"));
    assert_eq!(shed.header("x-weave-backoff"), Some("7"));
    let hb = http
        .get(format!("{}/__heartbeat__", env.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(hb.status(), 200, "heartbeats are not shed");
    let metrics = env.server.metrics(&http).await;
    assert!(metrics.contains("editiond_storage_in_flight 2"), "{metrics}");

    // The held requests end (401: they carry no Hawk header) and the load with them.
    assert!(release(first).await.starts_with("HTTP/1.1 401"));
    assert!(release(second).await.starts_with("HTTP/1.1 401"));
    let calm = c.get("storage/tabs").await;
    assert_eq!(calm.status, 200);
    assert_eq!(calm.header("x-weave-backoff"), None);
    assert_eq!(ids(&calm.json()), vec!["a", "b"]);
}
