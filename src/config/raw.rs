//! The configuration as it is written: the serde structs (`Raw*`), private
//! to this module, and their validation into the typed [`Config`], which
//! names the key of every problem.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::*;
use crate::core::{
    ConsumerKind, ConsumerProfile, DEFAULT_PREEMPT_GRACE, MAX_PRIORITY, MIN_PRIORITY,
    validate_consumer_name,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    listen: String,
    socket: String,
    capacity: u32,
    strict_consumers: bool,
    #[serde(with = "humantime_serde")]
    max_hold: Duration,
    #[serde(with = "humantime_serde")]
    shutdown_grace: Duration,
    #[serde(with = "humantime_serde")]
    lock_delay: Duration,
    state_dir: String,
    keepalive: RawKeepalive,
    gpu: RawGpu,
    auth: RawAuth,
    limits: RawLimits,
    scheduling: RawScheduling,
    #[serde(default)]
    consumers: BTreeMap<String, RawConsumer>,
    metrics: RawMetrics,
    #[serde(default)]
    gate: RawGate,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGate {
    #[serde(default)]
    consumer: Option<String>,
    #[serde(default)]
    listen: Option<String>,
    #[serde(default)]
    upstream: Option<String>,
    #[serde(default)]
    vram_mib: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    max_wait: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    linger: Option<Duration>,
    #[serde(default)]
    broker: Option<String>,
    #[serde(default)]
    token_file: Option<String>,
}

impl RawGate {
    fn validate(self) -> Result<GateConfig, ConfigError> {
        if let Some(consumer) = &self.consumer {
            validate_consumer_name(consumer)
                .map_err(|e| invalid("gate.consumer", e.to_string()))?;
        }
        let listen = match &self.listen {
            None => None,
            Some(addr) => Some(addr.trim().parse::<SocketAddr>().map_err(|e| {
                invalid(
                    "gate.listen",
                    format!("{addr:?} is not an IP address and port ({e})"),
                )
            })?),
        };
        if let Some(upstream) = &self.upstream {
            check_upstream(upstream).map_err(|problem| invalid("gate.upstream", problem))?;
        }
        Ok(GateConfig {
            consumer: self.consumer,
            listen,
            upstream: self.upstream,
            vram_mib: self.vram_mib,
            max_wait: self.max_wait.filter(|d| !d.is_zero()),
            linger: self.linger,
            broker: self.broker.filter(|b| !b.is_empty()),
            token_file: self.token_file.filter(|f| !f.is_empty()).map(PathBuf::from),
        })
    }
}

/// Whether `upstream` is a URL the gate can forward to: `http://HOST:PORT`
/// (a path is not allowed: requests keep their own).
pub(crate) fn check_upstream(upstream: &str) -> Result<(), String> {
    let uri: hyper::Uri = upstream
        .parse()
        .map_err(|e| format!("{upstream:?} is not a URL ({e})"))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(format!(
            "{upstream:?} is not an http://HOST:PORT URL (the gate speaks plain HTTP/1.1)"
        ));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!(
            "{upstream:?} has a path; give only http://HOST:PORT"
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScheduling {
    backfill: bool,
    #[serde(with = "humantime_serde")]
    aging: Duration,
    #[serde(with = "humantime_serde")]
    preempt_after: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_waiters: u32,
    max_waiters_per_consumer: u32,
    max_streams_per_connection: u32,
    max_labels: u32,
    max_label_key_bytes: u32,
    max_label_value_bytes: u32,
    max_message_bytes: u32,
}

impl RawLimits {
    /// The smallest message size that still carries an `acquire`.
    const MIN_MESSAGE_BYTES: u32 = 1024;

    fn validate(self) -> Result<Limits, ConfigError> {
        let positive = |key: &str, value: u32| {
            if value == 0 {
                Err(invalid(&format!("limits.{key}"), "must be at least 1"))
            } else {
                Ok(value)
            }
        };
        let limits = Limits {
            max_waiters: positive("max_waiters", self.max_waiters)?,
            max_waiters_per_consumer: positive(
                "max_waiters_per_consumer",
                self.max_waiters_per_consumer,
            )?,
            max_streams_per_connection: positive(
                "max_streams_per_connection",
                self.max_streams_per_connection,
            )?,
            max_labels: self.max_labels,
            max_label_key_bytes: positive("max_label_key_bytes", self.max_label_key_bytes)?,
            max_label_value_bytes: self.max_label_value_bytes,
            max_message_bytes: self.max_message_bytes,
        };
        if limits.max_message_bytes < Self::MIN_MESSAGE_BYTES {
            return Err(invalid(
                "limits.max_message_bytes",
                format!("must be at least {}", Self::MIN_MESSAGE_BYTES),
            ));
        }
        Ok(limits)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    admin_token: String,
    admin_token_file: String,
    status_requires_token: bool,
    tls_cert: String,
    tls_key: String,
    tls_client_ca: String,
    socket_mode: String,
    socket_group: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGpu {
    source: InventorySource,
    nvml_library: String,
    #[serde(deserialize_with = "sizes")]
    static_memory_mib: Vec<u64>,
    safety_margin_mib: u64,
    #[serde(with = "humantime_serde")]
    poll_interval: Duration,
    #[serde(with = "humantime_serde")]
    unload_timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeepalive {
    #[serde(with = "humantime_serde")]
    interval: Duration,
    #[serde(with = "humantime_serde")]
    timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsumer {
    #[serde(default = "RawKind::other")]
    kind: RawKind,
    #[serde(default)]
    vram_mib: u64,
    #[serde(default)]
    coexist: bool,
    #[serde(default, with = "humantime_serde")]
    idle_ttl: Option<Duration>,
    #[serde(default)]
    unload: Option<RawUnload>,
    #[serde(default)]
    token: String,
    #[serde(default)]
    token_file: String,
    #[serde(default)]
    unix_users: Vec<String>,
    #[serde(default)]
    unix_groups: Vec<String>,
    #[serde(default)]
    priority: i64,
    #[serde(default)]
    preemptible: bool,
    #[serde(default, with = "humantime_serde")]
    preempt_grace: Option<Duration>,
    #[serde(default)]
    trust_remote_pid: bool,
    #[serde(default, rename = "match")]
    matcher: Option<RawMatch>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    exe: Option<String>,
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    container: Option<String>,
}

impl RawMatch {
    fn validate(self, key: &str) -> Result<ProcessMatcher, ConfigError> {
        let non_empty = |name: &str, value: Option<String>| match value {
            Some(v) if v.trim().is_empty() => Err(invalid(&format!("{key}.{name}"), "is empty")),
            other => Ok(other.map(|v| v.trim().to_owned())),
        };
        let rule = ProcessMatcher {
            exe: non_empty("exe", self.exe)?,
            unit: non_empty("unit", self.unit)?,
            container: non_empty("container", self.container)?.map(|c| c.to_ascii_lowercase()),
        };
        if rule.exe.is_none() && rule.unit.is_none() && rule.container.is_none() {
            return Err(invalid(
                key,
                "needs at least one of `exe`, `unit` or `container`",
            ));
        }
        if let Some(id) = &rule.container
            && (id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(invalid(
                &format!("{key}.container"),
                format!("{id:?} is not a container id or a prefix of one (hex digits)"),
            ));
        }
        Ok(rule)
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawUnload {
    Stream(String),
    Command { command: Vec<String> },
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawKind {
    Tts,
    Llm,
    Image,
    Other,
}

impl RawKind {
    fn other() -> Self {
        Self::Other
    }
}

impl From<RawKind> for ConsumerKind {
    fn from(kind: RawKind) -> Self {
        match kind {
            RawKind::Tts => Self::Tts,
            RawKind::Llm => Self::Llm,
            RawKind::Image => Self::Image,
            RawKind::Other => Self::Other,
        }
    }
}

/// A list of sizes in MiB: `[24576, 24576]` in a file, and `24576` or
/// `24576,24576` in an environment variable, where the `config` crate hands
/// over a number or a list of strings.
fn sizes<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<u64>, D::Error> {
    use serde::de::{Error, SeqAccess, Visitor};

    struct Sizes;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Number(u64),
        Text(String),
    }

    impl<'de> Visitor<'de> for Sizes {
        type Value = Vec<u64>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of sizes in MiB, such as [24576, 24576]")
        }

        fn visit_u64<E: Error>(self, size: u64) -> Result<Vec<u64>, E> {
            Ok(vec![size])
        }

        fn visit_i64<E: Error>(self, size: i64) -> Result<Vec<u64>, E> {
            u64::try_from(size)
                .map(|size| vec![size])
                .map_err(|_| E::custom(format!("{size} is not a size")))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u64>, A::Error> {
            let mut sizes = Vec::new();
            while let Some(size) = seq.next_element::<Size>()? {
                sizes.push(match size {
                    Size::Number(size) => size,
                    Size::Text(text) => text
                        .trim()
                        .parse()
                        .map_err(|_| A::Error::custom(format!("{text:?} is not a size in MiB")))?,
                });
            }
            Ok(sizes)
        }
    }

    deserializer.deserialize_any(Sizes)
}

/// A secret given inline (`key`) or in a file (`key_file`), trimmed; never
/// both.
fn secret(key: &str, inline: String, file: String) -> Result<Option<Secret>, ConfigError> {
    match (inline.is_empty(), file.is_empty()) {
        (true, true) => Ok(None),
        (false, false) => Err(invalid(
            key,
            format!("give `{key}` or `{key}_file`, not both"),
        )),
        (false, true) => Ok(Some(Secret(inline.trim().to_owned()))),
        (true, false) => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| invalid(&format!("{key}_file"), format!("cannot read {file}: {e}")))?;
            let token = text.trim().to_owned();
            if token.is_empty() {
                return Err(invalid(&format!("{key}_file"), format!("{file} is empty")));
            }
            Ok(Some(Secret(token)))
        }
    }
}

fn optional_path(path: String) -> Option<PathBuf> {
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// `$STATE_DIRECTORY` (set by systemd's `StateDirectory=`), else
/// `/var/lib/gpulease` for root, else `$XDG_STATE_HOME/gpulease` or
/// `~/.local/state/gpulease`.
fn default_state_dir() -> PathBuf {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("STATE_DIRECTORY") {
        return PathBuf::from(dir);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/gpulease");
    }
    if let Some(dir) = var("XDG_STATE_HOME") {
        return PathBuf::from(dir).join("gpulease");
    }
    match var("HOME") {
        Some(home) => PathBuf::from(home).join(".local/state/gpulease"),
        None => std::env::temp_dir().join("gpulease-state"),
    }
}

/// The error for `key`, saying what is wrong with it.
pub(crate) fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        problem: problem.into(),
    }
}

impl RawConfig {
    pub(super) fn validate(self) -> Result<Config, ConfigError> {
        let listen = match self.listen.trim() {
            "" => None,
            addr => Some(addr.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    "listen",
                    format!("{addr:?} is not an IP address and port ({e})"),
                )
            })?),
        };
        let socket = (!self.socket.is_empty()).then(|| PathBuf::from(&self.socket));
        let metrics = MetricsConfig {
            listen: match self.metrics.listen.trim() {
                "" => None,
                addr => Some(addr.parse::<SocketAddr>().map_err(|e| {
                    invalid(
                        "metrics.listen",
                        format!("{addr:?} is not an IP address and port ({e})"),
                    )
                })?),
            },
        };
        if listen.is_none() && socket.is_none() {
            return Err(invalid(
                "listen",
                "is empty and so is `socket`: the broker needs at least one place to listen",
            ));
        }
        if !(1..=1024).contains(&self.capacity) {
            return Err(invalid(
                "capacity",
                format!("must be between 1 and 1024, not {}", self.capacity),
            ));
        }
        for (key, value) in [
            ("keepalive.interval", self.keepalive.interval),
            ("keepalive.timeout", self.keepalive.timeout),
        ] {
            if value < Duration::from_millis(100) {
                return Err(invalid(
                    key,
                    format!(
                        "must be at least 100ms, not {}",
                        humantime::format_duration(value)
                    ),
                ));
            }
        }
        if self.gpu.poll_interval < Duration::from_millis(10) {
            return Err(invalid("gpu.poll_interval", "must be at least 10ms"));
        }
        let mut consumers = BTreeMap::new();
        for (name, consumer) in self.consumers {
            let key = format!("consumers.{name}");
            validate_consumer_name(&name).map_err(|e| invalid(&key, e.to_string()))?;
            let matcher = match consumer.matcher {
                Some(rule) => Some(rule.validate(&format!("{key}.match"))?),
                None => None,
            };
            let token = secret(&format!("{key}.token"), consumer.token, consumer.token_file)?;
            let auth = ConsumerAuth {
                token,
                unix_users: consumer.unix_users,
                unix_groups: consumer.unix_groups,
                trust_remote_pid: consumer.trust_remote_pid,
            };
            let method = match consumer.unload {
                None => None,
                Some(RawUnload::Stream(word)) if word == "stream" => Some(UnloadMethod::Stream),
                Some(RawUnload::Stream(word)) => {
                    return Err(invalid(
                        &format!("{key}.unload"),
                        format!("{word:?} is neither \"stream\" nor {{ command = [...] }}"),
                    ));
                }
                Some(RawUnload::Command { command }) if command.is_empty() => {
                    return Err(invalid(&format!("{key}.unload.command"), "is empty"));
                }
                Some(RawUnload::Command { command }) => Some(UnloadMethod::Command(command)),
            };
            let priority = i32::try_from(consumer.priority)
                .ok()
                .filter(|p| (MIN_PRIORITY..=MAX_PRIORITY).contains(p))
                .ok_or_else(|| {
                    invalid(
                        &format!("{key}.priority"),
                        format!(
                            "must be between {MIN_PRIORITY} and {MAX_PRIORITY}, not {}",
                            consumer.priority
                        ),
                    )
                })?;
            if consumer.preempt_grace.is_some() && !consumer.preemptible {
                return Err(invalid(
                    &format!("{key}.preempt_grace"),
                    "is set but `preemptible` is not true",
                ));
            }
            let profile = ConsumerProfile {
                name: name.clone(),
                kind: consumer.kind.into(),
                vram_mib: consumer.vram_mib,
                coexist: consumer.coexist,
                unloadable: method.is_some(),
                idle_ttl: consumer.idle_ttl.filter(|ttl| !ttl.is_zero()),
                priority,
                preemptible: consumer.preemptible,
                preempt_grace: consumer.preempt_grace.unwrap_or(DEFAULT_PREEMPT_GRACE),
            };
            consumers.insert(
                name,
                Consumer {
                    profile,
                    unload: method,
                    auth,
                    matcher,
                },
            );
        }
        let auth = self.auth;
        let socket_mode = u32::from_str_radix(auth.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|mode| *mode <= 0o777)
            .ok_or_else(|| {
                invalid(
                    "auth.socket_mode",
                    format!(
                        "{:?} is not an octal mode such as \"0660\"",
                        auth.socket_mode
                    ),
                )
            })?;
        let tls = match (optional_path(auth.tls_cert), optional_path(auth.tls_key)) {
            (None, None) if auth.tls_client_ca.is_empty() => None,
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                client_ca: optional_path(auth.tls_client_ca),
            }),
            _ => {
                return Err(invalid(
                    "auth.tls_cert",
                    "TLS needs both `tls_cert` and `tls_key` (and `tls_client_ca` needs them too)",
                ));
            }
        };
        let mut tokens: Vec<&Secret> = consumers
            .values()
            .filter_map(|c| c.auth.token.as_ref())
            .collect();
        let admin_token = secret("auth.admin_token", auth.admin_token, auth.admin_token_file)?;
        tokens.extend(admin_token.as_ref());
        let distinct: std::collections::HashSet<&Secret> = tokens.iter().copied().collect();
        if distinct.len() != tokens.len() {
            return Err(invalid(
                "auth",
                "two identities share a token; each needs its own",
            ));
        }
        if let Some(files) = &tls {
            // Read and parsed now, so that a broken file is a configuration
            // error before anything is bound; the server reads them again.
            crate::tls::server_config(files)?;
        }
        let socket_group = match auth.socket_group.as_str() {
            "" => None,
            _ => Some(SocketGroup::resolve(auth.socket_group)?),
        };
        let auth = AuthConfig {
            admin_token,
            status_requires_token: auth.status_requires_token,
            tls,
            socket_mode,
            socket_group,
        };
        let gpu = GpuConfig {
            source: self.gpu.source,
            nvml_library: (!self.gpu.nvml_library.is_empty())
                .then(|| PathBuf::from(&self.gpu.nvml_library)),
            static_memory_mib: self.gpu.static_memory_mib,
            safety_margin_mib: self.gpu.safety_margin_mib,
            poll_interval: self.gpu.poll_interval,
            unload_timeout: self.gpu.unload_timeout,
        };
        Ok(Config {
            listen,
            socket,
            capacity: self.capacity,
            strict_consumers: self.strict_consumers,
            max_hold: (!self.max_hold.is_zero()).then_some(self.max_hold),
            shutdown_grace: self.shutdown_grace,
            lock_delay: self.lock_delay,
            state_dir: if self.state_dir.is_empty() {
                default_state_dir()
            } else {
                PathBuf::from(self.state_dir)
            },
            keepalive_interval: self.keepalive.interval,
            keepalive_timeout: self.keepalive.timeout,
            consumers,
            gpu,
            auth,
            metrics,
            file: None,
            limits: self.limits.validate()?,
            scheduling: SchedulingConfig {
                backfill: self.scheduling.backfill,
                aging: self.scheduling.aging,
                preempt_after: self.scheduling.preempt_after,
            },
            gate: self.gate.validate()?,
        })
    }
}
