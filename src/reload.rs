//! Live reload: SIGHUP and the `Reload` call re-read the configuration file,
//! validate it in full, and apply what can change while the broker runs.
//!
//! Applied live: the consumers (sizes, kinds, adapters, idle TTLs), tokens
//! and Unix rules, `max_hold` (held leases follow it), `capacity`,
//! `strict_consumers`, `lock_delay`, `[scheduling]`, the `[gpu]` margins
//! and timings, and the queue's and the labels' `[limits]`. A consumer's
//! new `priority` applies to its requests from then on; those already
//! queued keep the place they have.
//! Kept until a restart, and named in the log: the listeners, TLS files,
//! the socket's mode and group, the state directory, keepalive, the GPU
//! inventory's source, `shutdown_grace` and the metrics listener. A file
//! that does not validate changes nothing. Leases and queues are never
//! touched by a reload.

use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use crate::auth::Authority;
use crate::broker::Broker;
use crate::config::Config;

/// What a reload did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ReloadReport {
    /// The keys (or sections) whose new values are in effect.
    pub applied: Vec<String>,
    /// The keys that changed in the file but need a restart; the running
    /// values are kept.
    pub needs_restart: Vec<String>,
}

impl ReloadReport {
    /// A sentence for the log and the operator.
    pub(crate) fn message(&self) -> String {
        let applied = if self.applied.is_empty() {
            "nothing to apply".to_owned()
        } else {
            format!("applied {}", self.applied.join(", "))
        };
        if self.needs_restart.is_empty() {
            format!("configuration reloaded: {applied}")
        } else {
            format!(
                "configuration reloaded: {applied}; kept until a restart: {}",
                self.needs_restart.join(", ")
            )
        }
    }
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
#[error("the configuration is not valid, so the running one is kept: {0}")]
pub(crate) struct ReloadError(pub String);

/// Re-reads the configuration and applies it to the running broker.
#[derive(Debug)]
pub(crate) struct Reloader {
    /// The configuration in effect (with the running values of the keys
    /// that need a restart).
    current: Mutex<Config>,
    broker: Arc<Broker>,
    authority: Arc<Authority>,
}

impl Reloader {
    /// A reloader for the broker started with `config`.
    pub(crate) fn new(config: Config, broker: Arc<Broker>, authority: Arc<Authority>) -> Self {
        Self {
            current: Mutex::new(config),
            broker,
            authority,
        }
    }

    /// Reads the file the broker started with (and the `GPULEASE__*`
    /// variables) again, validates everything, and applies what can change
    /// live. Blocking (it reads files); concurrent reloads run one after
    /// the other.
    pub(crate) fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        crate::notify::reloading();
        // Validation reads the TLS files too: a new path needs a restart,
        // but a file named now must still be readable.
        let loaded =
            Config::load(current.file.as_deref(), None).map_err(|e| ReloadError(e.to_string()));
        let new = match loaded {
            Ok(new) => new,
            Err(e) => {
                warn!(error = %e.0, "reload refused; the running configuration is kept");
                self.broker.reloaded(Err(e.0.clone()));
                crate::notify::reloaded(&self.broker, "refused (invalid configuration)");
                return Err(e);
            }
        };
        let (effective, report) = merge(&current, new);
        self.authority
            .replace(&effective.auth, &effective.consumers);
        self.broker.reconfigure(&effective);
        *current = effective;
        let message = report.message();
        if report.needs_restart.is_empty() {
            info!(applied = ?report.applied, "{message}");
        } else {
            warn!(applied = ?report.applied, needs_restart = ?report.needs_restart, "{message}");
        }
        self.broker.reloaded(Ok(()));
        crate::notify::reloaded(&self.broker, "applied");
        Ok(report)
    }
}

/// The configuration to run with after a reload from `running` to `new`:
/// `new`, except that the keys that need a restart keep their running
/// values; and what changed.
fn merge(running: &Config, mut new: Config) -> (Config, ReloadReport) {
    // Every key is sorted below into live or restart: a new field of
    // `Config` fails to compile here until it is.
    let Config {
        listen: _,
        socket: _,
        capacity: _,
        strict_consumers: _,
        max_hold: _,
        shutdown_grace: _,
        lock_delay: _,
        state_dir: _,
        keepalive_interval: _,
        keepalive_timeout: _,
        consumers: _,
        gpu: _,
        auth: _,
        metrics: _,
        file: _,
        limits: _,
        scheduling: _,
        // For `gpulease gate`, not the broker.
        gate: _,
    } = running;
    let mut report = ReloadReport::default();
    macro_rules! live {
        ($key:literal, $($field:tt)+) => {
            if running.$($field)+ != new.$($field)+ {
                report.applied.push($key.to_owned());
            }
        };
    }
    macro_rules! restart {
        ($key:literal, $($field:tt)+) => {
            if running.$($field)+ != new.$($field)+ {
                report.needs_restart.push($key.to_owned());
                new.$($field)+ = running.$($field)+.clone();
            }
        };
    }
    if running.consumers != new.consumers {
        report.applied.push("consumers".to_owned());
    }
    live!("capacity", capacity);
    live!("strict_consumers", strict_consumers);
    live!("max_hold", max_hold);
    live!("lock_delay", lock_delay);
    live!("scheduling.backfill", scheduling.backfill);
    live!("scheduling.aging", scheduling.aging);
    live!("scheduling.preempt_after", scheduling.preempt_after);
    live!("gpu.safety_margin_mib", gpu.safety_margin_mib);
    live!("gpu.poll_interval", gpu.poll_interval);
    live!("gpu.unload_timeout", gpu.unload_timeout);
    live!("auth.admin_token", auth.admin_token);
    live!("auth.status_requires_token", auth.status_requires_token);
    restart!("listen", listen);
    restart!("socket", socket);
    restart!("auth.socket_mode", auth.socket_mode);
    restart!("auth.socket_group", auth.socket_group);
    restart!("auth.tls_cert", auth.tls);
    restart!("state_dir", state_dir);
    restart!("shutdown_grace", shutdown_grace);
    restart!("keepalive.interval", keepalive_interval);
    restart!("keepalive.timeout", keepalive_timeout);
    restart!("gpu.source", gpu.source);
    restart!("gpu.nvml_library", gpu.nvml_library);
    restart!("gpu.static_memory_mib", gpu.static_memory_mib);
    restart!("metrics.listen", metrics.listen);
    live!("limits.max_waiters", limits.max_waiters);
    live!(
        "limits.max_waiters_per_consumer",
        limits.max_waiters_per_consumer
    );
    live!("limits.max_labels", limits.max_labels);
    live!("limits.max_label_key_bytes", limits.max_label_key_bytes);
    live!("limits.max_label_value_bytes", limits.max_label_value_bytes);
    // Baked into the servers: the codec's bound and HTTP/2's settings.
    restart!("limits.max_message_bytes", limits.max_message_bytes);
    restart!(
        "limits.max_streams_per_connection",
        limits.max_streams_per_connection
    );
    (new, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpulease.toml");
        std::fs::write(&path, toml).unwrap();
        Config::load(Some(&path), Some(Default::default())).unwrap()
    }

    #[test]
    fn live_keys_apply_and_restart_keys_keep_their_running_values() {
        let running =
            load("capacity = 1\nlisten = \"127.0.0.1:7000\"\n[consumers.a]\ntoken = \"x\"");
        let new = load(
            "capacity = 2\nlisten = \"127.0.0.1:7001\"\nmax_hold = \"1h\"\n\
             [consumers.a]\ntoken = \"y\"\n[keepalive]\ninterval = \"1s\"",
        );
        let (effective, report) = merge(&running, new);
        assert_eq!(report.applied, ["consumers", "capacity", "max_hold"]);
        assert_eq!(report.needs_restart, ["listen", "keepalive.interval"]);
        assert_eq!(effective.capacity, 2);
        assert_eq!(effective.listen, running.listen);
        assert_eq!(effective.keepalive_interval, running.keepalive_interval);
        assert_eq!(
            effective.consumers["a"]
                .auth
                .token
                .as_ref()
                .unwrap()
                .expose(),
            "y"
        );
        let message = report.message();
        assert!(message.contains("applied consumers, capacity, max_hold"));
        assert!(message.contains("kept until a restart: listen, keepalive.interval"));
        let (_, nothing) = merge(&running, running.clone());
        assert_eq!(nothing, ReloadReport::default());
        assert_eq!(
            nothing.message(),
            "configuration reloaded: nothing to apply"
        );
    }
}
