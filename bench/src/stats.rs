//! Percentiles of latency samples.

use serde::Serialize;

/// The distribution of a set of latency samples, in microseconds.
///
/// Percentiles use the nearest-rank method: p50 is a sample that was
/// actually observed, never an interpolation between two.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Summary {
    /// How many samples.
    pub(crate) n: usize,
    /// The smallest sample.
    pub(crate) min_us: f64,
    /// The median.
    pub(crate) p50_us: f64,
    /// The 90th percentile.
    pub(crate) p90_us: f64,
    /// The 99th percentile.
    pub(crate) p99_us: f64,
    /// The largest sample.
    pub(crate) max_us: f64,
    /// The arithmetic mean.
    pub(crate) mean_us: f64,
}

impl Summary {
    /// Summarises samples given in nanoseconds; `None` when there are none.
    pub(crate) fn of_ns(samples: &[u64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let us = |ns: u64| ns as f64 / 1_000.0;
        let rank = |p: f64| {
            let index = (p / 100.0 * sorted.len() as f64).ceil() as usize;
            us(sorted[index.clamp(1, sorted.len()) - 1])
        };
        let total: u128 = sorted.iter().map(|&ns| u128::from(ns)).sum();
        Some(Self {
            n: sorted.len(),
            min_us: us(sorted[0]),
            p50_us: rank(50.0),
            p90_us: rank(90.0),
            p99_us: rank(99.0),
            max_us: us(sorted[sorted.len() - 1]),
            mean_us: total as f64 / sorted.len() as f64 / 1_000.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Summary;

    #[test]
    fn nearest_rank() {
        let samples: Vec<u64> = (1..=100).map(|i| i * 1_000).collect();
        let summary = Summary::of_ns(&samples).unwrap();
        assert_eq!(summary.p50_us, 50.0);
        assert_eq!(summary.p90_us, 90.0);
        assert_eq!(summary.p99_us, 99.0);
        assert_eq!(summary.min_us, 1.0);
        assert_eq!(summary.max_us, 100.0);
        assert_eq!(Summary::of_ns(&[7_000]).unwrap().p99_us, 7.0);
        assert!(Summary::of_ns(&[]).is_none());
    }
}
