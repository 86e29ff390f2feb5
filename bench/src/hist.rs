//! A lock-free latency histogram in microseconds: exact below 64 µs, then 32 buckets per power
//! of two (at most 3 % error), so many tasks record at once without a lock or an allocation.

use std::sync::atomic::{AtomicU64, Ordering};

const LINEAR: u64 = 64;
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = (LINEAR + (64 - 6) * SUB) as usize;

pub struct Histogram {
    counts: Vec<AtomicU64>,
    max: AtomicU64,
}

/// Percentiles of what was recorded, in microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

fn index(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let e = 63 - v.leading_zeros();
    (LINEAR + u64::from(e - 6) * SUB + ((v >> (e - SUB_BITS)) & (SUB - 1))) as usize
}

/// The smallest value that falls in bucket `i`.
fn lower(i: usize) -> u64 {
    let i = i as u64;
    if i < LINEAR {
        return i;
    }
    let j = i - LINEAR;
    let e = j / SUB + 6;
    (SUB + j % SUB) << (e - u64::from(SUB_BITS))
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn record(&self, micros: u64) {
        self.counts[index(micros)].fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(micros, Ordering::Relaxed);
    }

    pub fn reset(&self) {
        for c in &self.counts {
            c.store(0, Ordering::Relaxed);
        }
        self.max.store(0, Ordering::Relaxed);
    }

    /// Percentiles, each reported as the top of its bucket (never optimistic).
    pub fn summary(&self) -> Summary {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let count: u64 = counts.iter().sum();
        let max = self.max.load(Ordering::Relaxed);
        let at = |q: f64| -> u64 {
            if count == 0 {
                return 0;
            }
            let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return lower(i + 1).saturating_sub(1).min(max);
                }
            }
            max
        };
        Summary {
            count,
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_tight() {
        for v in [0, 1, 63, 64, 65, 127, 128, 1000, 4999, 123_456, 10_000_000_000] {
            let i = index(v);
            assert!(lower(i) <= v && v < lower(i + 1), "{v}");
            assert!(
                (lower(i + 1) - lower(i)) as f64 <= 1.0_f64.max(v as f64 / 31.0),
                "{v}"
            );
        }
    }

    #[test]
    fn percentiles() {
        let h = Histogram::default();
        for v in 1..=1000 {
            h.record(v);
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert!((490..=520).contains(&s.p50), "{s:?}");
        assert!((980..=1000).contains(&s.p99), "{s:?}");
        assert_eq!(s.max, 1000);
    }
}
