//! The one clock: `CLOCK_MONOTONIC`, which is system-wide, so that readings
//! taken in different processes on the host compare. A handoff's release
//! and grant are read in different processes; the history tests stamp their
//! workers' events and the broker's log lines with it.

use std::time::Duration;

use nix::time::{ClockId, clock_gettime};

/// Nanoseconds on `CLOCK_MONOTONIC`.
pub fn now_ns() -> u64 {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always readable on Linux");
    u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(now.tv_nsec()).unwrap_or(0)
}

/// `duration` in nanoseconds, saturating.
pub fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Nanoseconds as milliseconds, for reports.
pub fn millis(ns: u64) -> f64 {
    ns as f64 / 1e6
}
