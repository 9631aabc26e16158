//! The one clock every recorder reads: `CLOCK_MONOTONIC`, which is
//! system-wide, so that times taken in the test, in its worker processes and
//! when a broker log line is read compare with each other.

use std::time::Duration;

use nix::time::{ClockId, clock_gettime};

/// Nanoseconds on `CLOCK_MONOTONIC`.
pub(crate) fn now() -> u64 {
    let ts = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC is always readable");
    u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec()).unwrap_or(0)
}

/// `duration` in nanoseconds, saturating.
pub(crate) fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Nanoseconds as milliseconds, for reports.
pub(crate) fn millis(ns: u64) -> f64 {
    ns as f64 / 1e6
}
