//! Telling the service manager how the broker is (systemd's `Type=notify`):
//! `READY=1` once every listener accepts, `RELOADING=1` around a reload,
//! `STOPPING=1` at shutdown, a `STATUS=` line with the holders and the queue
//! now and then, and `WATCHDOG=1` when the unit sets `WatchdogSec`.
//!
//! Without `$NOTIFY_SOCKET` (not started by systemd) every call does
//! nothing. A failure to notify is logged, never fatal: the broker serves
//! whether or not anybody listens.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::broker::Broker;

/// How often the `STATUS=` line is refreshed, at most.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// Whether a failure to notify was already logged (once is enough).
static WARNED: AtomicBool = AtomicBool::new(false);

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        if WARNED.swap(true, Ordering::Relaxed) {
            debug!(error = %e, "cannot notify the service manager");
        } else {
            warn!(error = %e, "cannot notify the service manager ($NOTIFY_SOCKET)");
        }
    }
}

/// The listeners accept: `READY=1`, with a first status line.
pub(crate) fn ready(broker: &Broker) {
    let status = status_line(broker);
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// A reload starts: `RELOADING=1` (with the time, as systemd wants it).
pub(crate) fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// A reload is over (applied or refused): `READY=1` again.
pub(crate) fn reloaded(broker: &Broker, outcome: &str) {
    let status = format!("{}; last reload: {outcome}", status_line(broker));
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// Shutdown starts: `STOPPING=1`.
pub(crate) fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

fn status_line(broker: &Broker) -> String {
    let (held, queued) = broker.counts();
    format!("{held} held, {queued} queued")
}

/// Until `stop`: refreshes the `STATUS=` line when it changed, and sends
/// `WATCHDOG=1` every half of `$WATCHDOG_USEC` if the unit set a watchdog.
/// Each ping first takes the core's lock (for the status counts), so a
/// broker whose core is wedged stops pinging and systemd restarts it.
pub(crate) async fn keep_informed(broker: Arc<Broker>, stop: CancellationToken) {
    let watchdog = sd_notify::watchdog_enabled().filter(|d| !d.is_zero());
    let tick = watchdog.map_or(STATUS_INTERVAL, |d| (d / 2).min(STATUS_INTERVAL));
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = String::new();
    let mut last_sent = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => return,
        }
        let status = status_line(&broker);
        let stale = last_sent.elapsed() >= STATUS_INTERVAL;
        let mut states = Vec::new();
        if watchdog.is_some() {
            states.push(NotifyState::Watchdog);
        }
        if status != last_status && stale {
            states.push(NotifyState::Status(&status));
        }
        if states.is_empty() {
            continue;
        }
        send(&states);
        if states.len() > usize::from(watchdog.is_some()) {
            last_sent = tokio::time::Instant::now();
            last_status.clone_from(&status);
        }
    }
}
