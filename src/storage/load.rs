//! The storage API's load signal: how many of its requests are in flight (counted from
//! arrival to answer), and what that asks of clients (proto/storage.md, "Load"). Above
//! `backoff_in_flight` answers carry `X-Weave-Backoff` (the request was served, but sync less
//! often); above `shed_in_flight` a request is refused with 503, `Retry-After` and
//! `X-Weave-Backoff` before any work is done for it. The decision, [`level`], is pure.

use std::sync::atomic::{AtomicUsize, Ordering};

/// What the load asks of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Normal,
    /// Serve it, with `X-Weave-Backoff`.
    Busy,
    /// Refuse it with 503.
    Overloaded,
}

/// The level for a request that finds `in_flight` requests in flight, itself included, under
/// the thresholds `backoff_at` and `shed_at` (0: that threshold is off).
pub fn level(in_flight: usize, backoff_at: usize, shed_at: usize) -> Level {
    if shed_at > 0 && in_flight > shed_at {
        Level::Overloaded
    } else if backoff_at > 0 && in_flight > backoff_at {
        Level::Busy
    } else {
        Level::Normal
    }
}

/// The count of storage requests in flight, with its thresholds; exported as a gauge.
pub struct Load {
    in_flight: AtomicUsize,
    backoff_at: usize,
    shed_at: usize,
    /// `editiond_storage_in_flight`: the same count, for `/metrics`.
    pub gauge: prometheus::IntGauge,
}

impl Load {
    pub fn new(backoff_at: usize, shed_at: usize) -> Load {
        Load {
            in_flight: AtomicUsize::new(0),
            backoff_at,
            shed_at,
            gauge: prometheus::IntGauge::new(
                "storage_in_flight",
                "Storage API requests being served (the load signal of X-Weave-Backoff)",
            )
            .expect("valid metric"),
        }
    }

    /// Counts a request until the returned guard drops (also when its future is cancelled).
    pub fn enter(&self) -> Entered<'_> {
        let in_flight = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        self.gauge.inc();
        Entered {
            load: self,
            level: level(in_flight, self.backoff_at, self.shed_at),
        }
    }
}

/// One request in flight.
pub struct Entered<'a> {
    load: &'a Load,
    pub level: Level,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.load.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.load.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_exclusive_and_zero_is_off() {
        assert_eq!(level(1, 1, 2), Level::Normal);
        assert_eq!(level(2, 1, 2), Level::Busy);
        assert_eq!(level(3, 1, 2), Level::Overloaded);
        assert_eq!(level(1_000_000, 0, 0), Level::Normal);
        assert_eq!(level(5, 0, 4), Level::Overloaded);
        assert_eq!(level(5, 4, 0), Level::Busy);
    }

    #[test]
    fn requests_count_until_their_guard_drops() {
        let load = Load::new(1, 2);
        let first = load.enter();
        assert_eq!(first.level, Level::Normal);
        let second = load.enter();
        assert_eq!(second.level, Level::Busy);
        assert_eq!(load.enter().level, Level::Overloaded);
        assert_eq!(load.gauge.get(), 2, "the refused one is gone again");
        drop((first, second));
        assert_eq!(load.enter().level, Level::Normal);
        assert_eq!(load.gauge.get(), 0);
    }
}
