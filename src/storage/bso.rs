//! Basic Storage Objects: validation of what clients send, and Sync's timestamp format.
//!
//! Pure code, no I/O. Timestamps are kept as integer milliseconds that are multiples of 10 and
//! written as seconds with exactly two decimals (`1700000000.12`), as Sync 1.5 clients expect.

use serde_json::Value;

/// Now, in ms since the epoch, rounded down to Sync's 10 ms resolution.
pub fn now_ms() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    ms - ms % 10
}

/// `1234560` → `"1234.56"`.
pub fn format_ts(ms: u64) -> String {
    format!("{}.{:02}", ms / 1000, (ms % 1000) / 10)
}

/// A non-negative timestamp in seconds (`"1234.56"`, `"1234"`, `"1234.5600001"`) → ms, rounded
/// to the nearest ms (clients compute these in floating point). `None` when malformed or negative.
pub fn parse_ts(text: &str) -> Option<u64> {
    let text = text.trim();
    if text.is_empty() || text.starts_with('-') || text.starts_with('+') {
        return None;
    }
    let seconds: f64 = text.parse().ok()?;
    if !seconds.is_finite() || !(0.0..=1e13).contains(&seconds) {
        return None;
    }
    Some((seconds * 1000.0).round() as u64)
}

/// Record ids: 1 to 64 printable ASCII characters.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// Collection names: 1 to 32 of `[A-Za-z0-9._-]`.
pub fn valid_collection(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Largest `sortindex` magnitude (nine digits, as the spec allows).
pub const MAX_SORTINDEX: i64 = 999_999_999;

/// A record as a client sent it (PUT body or one element of a POST): every field optional, so
/// an update that names only `ttl` changes only the expiry.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BsoIn {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sortindex: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u64>,
}

impl BsoIn {
    /// Bytes of payload this record carries.
    pub fn payload_len(&self) -> usize {
        self.payload.as_ref().map_or(0, String::len)
    }
}

/// Limits that apply to one record.
#[derive(Debug, Clone, Copy)]
pub struct RecordLimits {
    pub max_payload_bytes: usize,
    pub max_ttl_secs: u64,
}

/// Why one record was refused: the reason a POST reports in `failed`.
pub type Reason = String;

/// Validates one JSON record. A JSON value that is not an object is not a record at all; the
/// caller refuses the whole request for it. `modified` is accepted and ignored; any other
/// unknown field is invalid.
pub fn parse_record(value: &Value, limits: RecordLimits) -> Result<BsoIn, Reason> {
    let Some(object) = value.as_object() else {
        return Err("not an object".into());
    };
    let mut bso = BsoIn {
        id: None,
        payload: None,
        sortindex: None,
        ttl: None,
    };
    for (key, value) in object {
        match (key.as_str(), value) {
            (_, Value::Null) if key != "id" => {}
            ("id", Value::String(id)) => {
                if !valid_id(id) {
                    return Err("invalid id".into());
                }
                bso.id = Some(id.clone());
            }
            ("id", _) => return Err("invalid id".into()),
            ("payload", Value::String(payload)) => {
                if payload.len() > limits.max_payload_bytes {
                    return Err("payload too large".into());
                }
                bso.payload = Some(payload.clone());
            }
            ("payload", _) => return Err("invalid payload".into()),
            ("sortindex", Value::Number(n)) => match n.as_i64() {
                Some(i) if (-MAX_SORTINDEX..=MAX_SORTINDEX).contains(&i) => {
                    bso.sortindex = Some(i as i32);
                }
                _ => return Err("invalid sortindex".into()),
            },
            ("sortindex", _) => return Err("invalid sortindex".into()),
            ("ttl", Value::Number(n)) => match n.as_u64() {
                Some(t) if t <= limits.max_ttl_secs => bso.ttl = Some(t),
                _ => return Err("invalid ttl".into()),
            },
            ("ttl", _) => return Err("invalid ttl".into()),
            ("modified", _) => {}
            _ => return Err(format!("unknown field {key:?}").chars().take(80).collect()),
        }
    }
    Ok(bso)
}

/// The IV that the reference server refuses in the `crypto` collection: a client that uploads
/// keys with it is broken and would lock every other device out.
const KNOWN_BAD_IV: &str = "AAAAAAAAAAAAAAAAAAAAAA==";

/// Whether `payload` is a known-bad upload to `collection` (refused with 400).
pub fn known_bad_payload(collection: &str, payload: &str) -> bool {
    if collection != "crypto" {
        return false;
    }
    serde_json::from_str::<Value>(payload)
        .ok()
        .and_then(|v| v.get("IV").and_then(Value::as_str).map(|iv| iv == KNOWN_BAD_IV))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: RecordLimits = RecordLimits {
        max_payload_bytes: 10,
        max_ttl_secs: 100,
    };

    #[test]
    fn timestamps_have_two_decimals_and_parse_back() {
        assert_eq!(format_ts(1_234_560), "1234.56");
        assert_eq!(format_ts(1_234_500), "1234.50");
        assert_eq!(format_ts(0), "0.00");
        assert_eq!(parse_ts("1234.56"), Some(1_234_560));
        assert_eq!(parse_ts("1234.5599999999"), Some(1_234_560));
        assert_eq!(parse_ts("7"), Some(7000));
        assert_eq!(parse_ts("-3"), None);
        assert_eq!(parse_ts("abc"), None);
        assert_eq!(parse_ts("inf"), None);
    }

    #[test]
    fn ids_and_collections() {
        assert!(valid_id("6820f3ca-6e8a-4ff4-8af7-8b3625d7d650"));
        assert!(valid_id("a b"));
        assert!(!valid_id(""));
        assert!(!valid_id("A\nB"));
        assert!(!valid_id("A\tB"));
        assert!(!valid_id(&"X".repeat(65)));
        assert!(valid_collection("xxx_col2"));
        assert!(!valid_collection("a/b"));
        assert!(!valid_collection(&"c".repeat(33)));
    }

    #[test]
    fn records_are_validated_field_by_field() {
        let ok = parse_record(
            &json!({"id": "a", "payload": "x", "sortindex": -42, "ttl": 5, "modified": 12}),
            LIMITS,
        );
        assert_eq!(
            ok,
            Ok(BsoIn {
                id: Some("a".into()),
                payload: Some("x".into()),
                sortindex: Some(-42),
                ttl: Some(5)
            })
        );
        let null_ttl = parse_record(&json!({"payload": "x", "ttl": null}), LIMITS).unwrap();
        assert_eq!(null_ttl.ttl, None);
        for bad in [
            json!({"id": ["a"]}),
            json!({"payload": 42}),
            json!({"payload": "x".repeat(11)}),
            json!({"sortindex": "1"}),
            json!({"sortindex": 2.6}),
            json!({"sortindex": 1_000_000_000}),
            json!({"ttl": -1}),
            json!({"ttl": "4"}),
            json!({"ttl": 101}),
            json!({"unexpected": 1}),
            json!("notabso"),
        ] {
            assert!(parse_record(&bad, LIMITS).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_crypto_refuses_the_zero_iv() {
        let payload = json!({"ciphertext": "x", "IV": KNOWN_BAD_IV}).to_string();
        assert!(known_bad_payload("crypto", &payload));
        assert!(!known_bad_payload("bookmarks", &payload));
        assert!(!known_bad_payload("crypto", "{\"IV\":\"abc\"}"));
    }
}
