//! Prometheus metrics, served as text at `GET /metrics`.
//!
//! Counters are bumped where things happen; gauges that mirror state (pending events, held UAIDs)
//! are read when scraped, so they cost nothing on the hot path.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabel {
    pub code: u16,
}

/// Every metric the server exports. Cheap to clone handles live inside (`Arc`s).
pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub held_uaids: Gauge,
    pub pending: Gauge,
    pub puts: Family<StatusLabel, Counter>,
    pub updates_sent: Counter,
    pub events_sent: Counter,
    pub acks: Counter,
    pub closes: Family<CloseLabel, Counter>,
    pub store_sync_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("editiond");
        let m = Metrics {
            connections: Gauge::default(),
            held_uaids: Gauge::default(),
            pending: Gauge::default(),
            puts: Family::default(),
            updates_sent: Counter::default(),
            events_sent: Counter::default(),
            acks: Counter::default(),
            closes: Family::default(),
            store_sync_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            registry: Registry::default(),
        };
        registry.register("connections", "Open WebSocket connections", m.connections.clone());
        registry.register(
            "held_uaids",
            "UAIDs held by connections on this node",
            m.held_uaids.clone(),
        );
        registry.register("pending_events", "Pending events in the store", m.pending.clone());
        registry.register("puts", "Endpoint PUTs by HTTP status", m.puts.clone());
        registry.register("updates_sent", "UPDATE frames sent", m.updates_sent.clone());
        registry.register(
            "events_sent",
            "Events carried by UPDATE frames and polls",
            m.events_sent.clone(),
        );
        registry.register("acks", "Events cleared by ACKs", m.acks.clone());
        registry.register("ws_closes", "WebSocket closes by close code", m.closes.clone());
        registry.register(
            "store_sync_seconds",
            "Time for a write to become durable (group commit wait)",
            m.store_sync_seconds.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
