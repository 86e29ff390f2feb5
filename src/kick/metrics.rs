//! The KICK drivers' metrics: kicks by driver and outcome, and UAIDs with a kick pending.
//! Registered into the server's [`crate::metrics::Metrics`] so `/metrics` shows them.

use prometheus::{IntCounterVec, IntGauge, Opts};

/// Cheap to clone (`Arc`s inside).
#[derive(Clone)]
pub struct KickMetrics {
    /// `editiond_kicks_total{driver, outcome}`: outcome is sent, retry, gone, rejected, expired
    /// (the event expired before a kick succeeded), cancelled (the UAID is no longer away) or
    /// dropped (over `kick.max_pending`).
    pub kicks: IntCounterVec,
    /// `editiond_kicks_pending`: UAIDs with a kick waiting, in flight or being retried.
    pub pending: IntGauge,
}

impl Default for KickMetrics {
    fn default() -> Self {
        // Constant names: a failure here is a programming error caught by tests.
        KickMetrics {
            kicks: IntCounterVec::new(
                Opts::new("kicks_total", "KICK attempts by driver and outcome"),
                &["driver", "outcome"],
            )
            .expect("valid metric"),
            pending: IntGauge::new("kicks_pending", "UAIDs with a kick waiting or being retried")
                .expect("valid metric"),
        }
    }
}

impl KickMetrics {
    /// Adds them to the server's metrics (call once).
    pub fn register(&self, metrics: &crate::metrics::Metrics) -> prometheus::Result<()> {
        metrics.register(Box::new(self.kicks.clone()))?;
        metrics.register(Box::new(self.pending.clone()))
    }

    pub fn count(&self, driver: &str, outcome: &str) {
        self.kicks.with_label_values(&[driver, outcome]).inc();
    }

    /// How many attempts of `driver` ended in `outcome` (for tests).
    pub fn get(&self, driver: &str, outcome: &str) -> u64 {
        self.kicks.with_label_values(&[driver, outcome]).get()
    }
}
