//! Prometheus metrics, served at `GET /metrics` in the Prometheus text format (0.0.4).
//!
//! Counters are bumped where things happen; gauges that mirror state (pending events, held UAIDs)
//! are read when scraped, so they cost nothing on the hot path.

use axum::http::StatusCode;
use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Every metric the server exports. The handles are cheap to clone (`Arc`s inside).
pub struct Metrics {
    registry: Registry,
    pub connections: IntGauge,
    pub held_uaids: IntGauge,
    pub pending: IntGauge,
    /// PUT rate-limit buckets held: registrations PUT to within about their refill time.
    pub put_buckets: IntGauge,
    puts: IntCounterVec,
    pub updates_sent: IntCounter,
    pub events_sent: IntCounter,
    pub acks: IntCounter,
    /// UPDATEs sent without a sync because PUTs here had already made their events durable.
    pub syncs_skipped: IntCounter,
    closes: IntCounterVec,
    pub store_sync_seconds: Histogram,
}

/// The text format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Default for Metrics {
    fn default() -> Self {
        // Names and buckets are constants: a failure here is a programming error caught by tests.
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let family = |name: &str, help: &str, label: &str| {
            IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric")
        };
        let buckets = exponential_buckets(0.0001, 2.0, 16).expect("valid buckets");
        let m = Metrics {
            registry: Registry::new_custom(Some("editiond".into()), None).expect("valid prefix"),
            connections: gauge("connections", "Open WebSocket connections"),
            held_uaids: gauge("held_uaids", "UAIDs held by connections on this node"),
            pending: gauge("pending_events", "Pending events in the store"),
            put_buckets: gauge(
                "put_rate_buckets",
                "Registrations with a PUT rate-limit bucket that is not full",
            ),
            puts: family("puts_total", "Endpoint PUTs by HTTP status", "status"),
            updates_sent: counter("updates_sent_total", "UPDATE frames sent"),
            events_sent: counter("events_sent_total", "Events carried by UPDATE frames and polls"),
            acks: counter("acks_total", "Events cleared by ACKs"),
            syncs_skipped: counter(
                "update_syncs_skipped_total",
                "UPDATEs sent without a store sync: every event was known committed",
            ),
            closes: family(
                "ws_closes_total",
                "WebSocket closes by the server, by close code",
                "code",
            ),
            store_sync_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "store_sync_seconds",
                    "Time for a write to become durable (group commit wait)",
                )
                .buckets(buckets),
            )
            .expect("valid metric"),
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 11] = [
            Box::new(m.connections.clone()),
            Box::new(m.held_uaids.clone()),
            Box::new(m.pending.clone()),
            Box::new(m.put_buckets.clone()),
            Box::new(m.puts.clone()),
            Box::new(m.updates_sent.clone()),
            Box::new(m.events_sent.clone()),
            Box::new(m.acks.clone()),
            Box::new(m.syncs_skipped.clone()),
            Box::new(m.closes.clone()),
            Box::new(m.store_sync_seconds.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        m
    }
}

impl Metrics {
    /// Counts one answered PUT (the label is the status's own `&'static str`: no allocation).
    pub fn count_put(&self, status: StatusCode) {
        self.puts.with_label_values(&[status.as_str()]).inc();
    }

    /// Counts one socket closed by the server with `code`.
    pub fn count_close(&self, code: u16) {
        self.closes.with_label_values(&[code.to_string()]).inc();
    }

    /// Adds a metric another module owns (the KICK scheduler's, the storage API's), under the
    /// same registry.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) -> prometheus::Result<()> {
        self.registry.register(collector)
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.count_put(StatusCode::ACCEPTED);
        m.count_put(StatusCode::TOO_MANY_REQUESTS);
        m.acks.inc();
        m.store_sync_seconds.observe(0.001);
        let text = m.render();
        assert!(text.contains("# TYPE editiond_puts_total counter"), "{text}");
        assert!(text.contains("editiond_puts_total{status=\"202\"} 1"), "{text}");
        assert!(text.contains("editiond_puts_total{status=\"429\"} 1"), "{text}");
        assert!(text.contains("editiond_acks_total 1"), "{text}");
        assert!(text.contains("editiond_store_sync_seconds_count 1"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
    }
}
