//! The broker's configuration: one typed struct, loaded once from the
//! embedded defaults, an optional TOML file and `GPULEASE__*` environment
//! variables, and validated in full before anything is bound.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::core::{
    ConsumerKind, ConsumerProfile, DEFAULT_PREEMPT_GRACE, MAX_PRIORITY, MIN_PRIORITY,
    validate_consumer_name,
};
use crate::matcher::ProcessMatcher;

/// The embedded defaults, as TOML; `gpulease serve --print-defaults` shows it.
pub const DEFAULTS: &str = include_str!("defaults.toml");

/// The validated configuration of `gpulease serve`.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// TCP address to serve on; `None` serves only on the socket.
    /// Default: `127.0.0.1:50051`.
    pub listen: Option<SocketAddr>,
    /// Unix-domain socket to serve on as well. Default: none.
    pub socket: Option<PathBuf>,
    /// How many leases may be held at once. Default: 1.
    pub capacity: u32,
    /// Refuse consumers that are not configured. Default: false.
    pub strict_consumers: bool,
    /// Revoke leases held longer than this. Default: never.
    pub max_hold: Option<Duration>,
    /// How long shutdown waits for streams to end. Default: 5 s.
    pub shutdown_grace: Duration,
    /// How long a hand-over after an ungraceful loss may wait for the
    /// holder's processes to leave the GPU. Default: 5 s.
    pub lock_delay: Duration,
    /// Where the state file lives. Default: see `defaults.toml`.
    pub state_dir: PathBuf,
    /// HTTP/2 keepalive ping interval. Default: 5 s.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered. Default: 5 s.
    pub keepalive_timeout: Duration,
    /// The configured consumers, by name: each `[consumers.NAME]` section
    /// whole.
    pub consumers: BTreeMap<String, Consumer>,
    /// The GPUs and their memory.
    pub gpu: GpuConfig,
    /// Who may call.
    pub auth: AuthConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// The file it was loaded from, if any: a reload reads it again.
    pub file: Option<PathBuf>,
    /// Bounds on what one client can make the broker hold or send.
    pub limits: Limits,
    /// A `gpulease gate` to run from this file (`[gate]`); the broker
    /// itself ignores it.
    pub gate: GateConfig,
    /// How each GPU's queue is served.
    pub scheduling: SchedulingConfig,
}

/// The `[gate]` section: what `gpulease gate --config FILE` runs, each key
/// the default of the flag of the same name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GateConfig {
    /// `--consumer`.
    pub consumer: Option<String>,
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--upstream`, an `http://HOST:PORT` URL.
    pub upstream: Option<String>,
    /// `--vram-mib`.
    pub vram_mib: Option<u64>,
    /// `--max-wait`.
    pub max_wait: Option<Duration>,
    /// `--linger`.
    pub linger: Option<Duration>,
    /// `--broker`; without it, the broker of this same file (its `socket`,
    /// else its `listen`).
    pub broker: Option<String>,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
}

/// The `[scheduling]` section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulingConfig {
    /// Grant later requests that fit now while the head of the queue
    /// cannot be granted, within the reservation rule. Default: true.
    pub backfill: bool,
    /// A waiter's effective priority rises by one for every whole `aging`
    /// it has waited; zero turns aging off. Default: 60 s.
    pub aging: Duration,
    /// How long a waiter of higher priority waits before preemptible
    /// holders in its way are asked to make room. Default: 30 s.
    pub preempt_after: Duration,
}

/// The `[metrics]` section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Where to serve `/metrics` over plain HTTP; `None` serves no metrics.
    /// Default: none (`""`), so that a second broker on the host, or one
    /// that nobody scrapes, opens no port it was not asked for.
    pub listen: Option<SocketAddr>,
}

/// The `[limits]` section: what one client can make the broker hold or
/// send. Each bound is refused with a status that names its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Requests waiting at once over all GPUs. Default: 32768.
    pub max_waiters: u32,
    /// Requests of one consumer waiting at once. Default: 16384.
    pub max_waiters_per_consumer: u32,
    /// Concurrent HTTP/2 streams per connection. Default: 1024.
    pub max_streams_per_connection: u32,
    /// Labels per request. Default: 16.
    pub max_labels: u32,
    /// Bytes in a label's key. Default: 63.
    pub max_label_key_bytes: u32,
    /// Bytes in a label's value. Default: 256.
    pub max_label_value_bytes: u32,
    /// Bytes in one message from a client. Default: 65536.
    pub max_message_bytes: u32,
}

/// A token: compared, sent, never printed (`gpulease serve --check` and logs
/// show it redacted).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(String);

impl Secret {
    /// The token itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The `[auth]` section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthConfig {
    /// The operator's token. Default: none.
    pub admin_token: Option<Secret>,
    /// Whether Status needs a token once tokens exist. Default: false.
    pub status_requires_token: bool,
    /// TLS for the TCP listener. Default: none.
    pub tls: Option<TlsFiles>,
    /// The Unix socket's mode. Default: 0o660.
    pub socket_mode: u32,
    /// The Unix socket's group. Default: the broker's.
    pub socket_group: Option<SocketGroup>,
}

/// The Unix socket's group, resolved when the configuration is loaded, so
/// that one that does not exist is a configuration error (exit 64), and
/// binding needs no second lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketGroup {
    /// As configured: a name or a numeric id.
    pub name: String,
    /// Its id.
    pub gid: u32,
}

impl SocketGroup {
    /// The group `name` (or numeric id) names on this machine.
    fn resolve(name: String) -> Result<Self, ConfigError> {
        let gid = match name.parse::<u32>() {
            Ok(gid) => Some(gid),
            Err(_) => nix::unistd::Group::from_name(&name)
                .ok()
                .flatten()
                .map(|group| group.gid.as_raw()),
        };
        match gid {
            Some(gid) => Ok(Self { name, gid }),
            None => Err(invalid("auth.socket_group", format!("no group {name:?}"))),
        }
    }
}

/// TLS certificate files, in PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The CA that client certificates must be signed by (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// One configured consumer: everything its `[consumers.NAME]` section
/// says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumer {
    /// What the scheduler knows of it: its name, kind, memory, priority,
    /// preemption and idle TTL.
    pub profile: ConsumerProfile,
    /// How to ask it to unload, if it can be asked.
    pub unload: Option<UnloadMethod>,
    /// Who may act as it.
    pub auth: ConsumerAuth,
    /// The rule that finds its processes when they take no lease.
    pub matcher: Option<ProcessMatcher>,
}

impl Config {
    /// The configured consumers' profiles, for the scheduler.
    pub fn profiles(&self) -> impl Iterator<Item = ConsumerProfile> + '_ {
        self.consumers.values().map(|c| c.profile.clone())
    }

    /// The consumers that can be asked to unload, and how.
    pub fn unload_methods(&self) -> BTreeMap<String, UnloadMethod> {
        self.consumers
            .iter()
            .filter_map(|(name, c)| Some((name.clone(), c.unload.clone()?)))
            .collect()
    }
}

/// Who may act as one consumer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsumerAuth {
    /// Its bearer token.
    pub token: Option<Secret>,
    /// Over the Unix socket, the users (names or ids) that may act as it.
    pub unix_users: Vec<String>,
    /// Over the Unix socket, the groups (names or ids) that may act as it.
    pub unix_groups: Vec<String>,
    /// Whether its `Acquire.client_pid` is believed when the broker cannot
    /// see the caller's process (remote TCP). Default: false.
    pub trust_remote_pid: bool,
}

/// Where the broker learns about GPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InventorySource {
    /// NVML if it loads, else static.
    Auto,
    /// NVML, or fail.
    Nvml,
    /// The configured sizes; never NVML.
    Static,
}

/// The `[gpu]` section.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuConfig {
    /// Where to learn about GPUs. Default: auto.
    pub source: InventorySource,
    /// The NVML library to load. Default: the system's.
    pub nvml_library: Option<PathBuf>,
    /// Without NVML, each GPU's memory in MiB. Default: one GPU of unknown
    /// size.
    pub static_memory_mib: Vec<u64>,
    /// Memory kept free beyond requests, in MiB. Default: 512.
    pub safety_margin_mib: u64,
    /// How often NVML is read. Default: 1 s.
    pub poll_interval: Duration,
    /// How long a resident has to unload. Default: 10 s.
    pub unload_timeout: Duration,
}

/// How a consumer is asked to free its GPU memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnloadMethod {
    /// Run this program (with `GPULEASE_CONSUMER`, `GPULEASE_GPU_INDEX` and
    /// `GPULEASE_GPU_UUID` in its environment).
    Command(Vec<String>),
    /// Send `UnloadRequested` on the consumer's `Residency` stream.
    Stream,
}

impl UnloadMethod {
    /// The name Status shows.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Command(_) => "command",
            Self::Stream => "stream",
        }
    }
}

/// Why the configuration cannot be used. The message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or a variable could not be read or parsed.
    #[error("{0}")]
    Load(#[from] config::ConfigError),
    /// A value was read but is not acceptable.
    #[error("`{key}`: {problem}")]
    Invalid {
        /// The key, as in the file (`keepalive.interval`).
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

impl Config {
    /// Loads the defaults, then `file` if given, then the `GPULEASE__*`
    /// variables of `env` (the process environment when `None`).
    pub fn load(
        file: Option<&Path>,
        env: Option<HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(file) = file {
            builder = builder.add_source(
                config::File::from(file)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let env = config::Environment::with_prefix("GPULEASE")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("gpu.static_memory_mib")
            .source(env.map(|vars| vars.into_iter().collect()));
        let raw: RawConfig = builder.add_source(env).build()?.try_deserialize()?;
        let mut config = raw.validate()?;
        config.file = file.map(Path::to_path_buf);
        Ok(config)
    }

    /// The embedded defaults alone.
    pub fn defaults() -> Self {
        Self::load(None, Some(HashMap::new())).expect("the embedded defaults are valid")
    }

    /// How long a frozen or vanished client keeps its lease at most.
    pub fn dead_client_bound(&self) -> Duration {
        self.keepalive_interval + self.keepalive_timeout
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
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
pub fn check_upstream(upstream: &str) -> Result<(), String> {
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
    fn validate(self) -> Result<Config, ConfigError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpulease.toml");
        std::fs::write(&path, toml).unwrap();
        let env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::load(Some(&path), Some(env))
    }

    fn error(toml: &str, env: &[(&str, &str)]) -> String {
        load(toml, env).unwrap_err().to_string()
    }

    #[test]
    fn defaults() {
        let config = Config::defaults();
        assert_eq!(config.listen, Some("127.0.0.1:50051".parse().unwrap()));
        assert_eq!(config.socket, None);
        assert_eq!(config.capacity, 1);
        assert!(!config.strict_consumers);
        assert_eq!(config.max_hold, None);
        assert_eq!(config.dead_client_bound(), Duration::from_secs(10));
        assert!(config.consumers.is_empty());
        assert_eq!(config.metrics.listen, None);
        assert_eq!(
            config.scheduling,
            SchedulingConfig {
                backfill: true,
                aging: Duration::from_secs(60),
                preempt_after: Duration::from_secs(30),
            }
        );
    }

    #[test]
    fn priorities_and_preemption() {
        let config = load(
            r#"
            [scheduling]
            backfill = false
            aging = "0s"
            preempt_after = "2m"
            [consumers.mvoice]
            priority = 10
            [consumers.train]
            priority = -5
            preemptible = true
            preempt_grace = "1m"
            [consumers.batch]
            preemptible = true
            "#,
            &[],
        )
        .unwrap();
        assert!(!config.scheduling.backfill);
        assert_eq!(config.scheduling.aging, Duration::ZERO);
        assert_eq!(config.scheduling.preempt_after, Duration::from_secs(120));
        let by_name = |name: &str| &config.consumers[name].profile;
        assert_eq!(by_name("mvoice").priority, 10);
        assert!(!by_name("mvoice").preemptible);
        assert_eq!(by_name("train").priority, -5);
        assert_eq!(by_name("train").preempt_grace, Duration::from_secs(60));
        assert_eq!(by_name("batch").preempt_grace, Duration::from_secs(30));
        assert!(error("[consumers.x]\npriority = 5000", &[]).contains("`consumers.x.priority`"));
        assert!(error("[consumers.x]\npriority = \"high\"", &[]).contains("priority"));
        assert!(
            error("[consumers.x]\npreempt_grace = \"5s\"", &[])
                .contains("`consumers.x.preempt_grace`")
        );
        assert!(error("[scheduling]\naging = \"often\"", &[]).contains("aging"));
        assert!(error("[scheduling]\nbackfil = true", &[]).contains("backfil"));
    }

    #[test]
    fn file_then_environment() {
        let config = load(
            r#"
            capacity = 3
            max_hold = "10m"
            socket = "/tmp/gpulease.sock"
            [keepalive]
            interval = "2s"
            [consumers.mvoice]
            kind = "tts"
            vram_mib = 3000
            coexist = true
            [consumers.ollama]
            kind = "llm"
            idle_ttl = "5m"
            unload = { command = ["curl", "-d", "{}", "http://127.0.0.1:11434/api/generate"] }
            [gpu]
            static_memory_mib = [16384, 8192]
            "#,
            &[
                ("GPULEASE__CAPACITY", "2"),
                ("GPULEASE__KEEPALIVE__TIMEOUT", "1s"),
            ],
        )
        .unwrap();
        assert_eq!(config.capacity, 2);
        assert_eq!(config.max_hold, Some(Duration::from_secs(600)));
        assert_eq!(config.socket, Some(PathBuf::from("/tmp/gpulease.sock")));
        assert_eq!(config.keepalive_interval, Duration::from_secs(2));
        assert_eq!(config.keepalive_timeout, Duration::from_secs(1));
        assert_eq!(config.gpu.static_memory_mib, [16384, 8192]);
        for (value, sizes) in [("8192", vec![8192]), ("8192,4096", vec![8192, 4096])] {
            let env = [("GPULEASE__GPU__STATIC_MEMORY_MIB", value)];
            assert_eq!(load("", &env).unwrap().gpu.static_memory_mib, sizes);
        }
        assert!(error("", &[("GPULEASE__GPU__STATIC_MEMORY_MIB", "8G")]).contains("8G"));
        assert_eq!(config.gpu.source, InventorySource::Auto);
        assert_eq!(
            config.consumers["ollama"].unload.clone().unwrap(),
            UnloadMethod::Command(vec![
                "curl".into(),
                "-d".into(),
                "{}".into(),
                "http://127.0.0.1:11434/api/generate".into()
            ])
        );
        assert_eq!(
            config.profiles().collect::<Vec<_>>(),
            [
                ConsumerProfile {
                    vram_mib: 3000,
                    coexist: true,
                    ..ConsumerProfile::new("mvoice", ConsumerKind::Tts)
                },
                ConsumerProfile {
                    unloadable: true,
                    idle_ttl: Some(Duration::from_secs(300)),
                    ..ConsumerProfile::new("ollama", ConsumerKind::Llm)
                },
            ]
        );
    }

    /// Every TOML example in the README is a valid configuration.
    #[test]
    fn the_readme_examples_load() {
        let readme = include_str!("../README.md");
        let mut examples = 0;
        for block in readme.split("```toml\n").skip(1) {
            let example = block.split("```").next().unwrap();
            match load(example, &[]) {
                Ok(_) => {}
                // The examples name files that exist on the reader's machine.
                Err(e) if e.to_string().contains("cannot read /etc/gpulease/") => {}
                Err(e) => panic!("{e}\n{example}"),
            }
            examples += 1;
        }
        assert!(examples >= 5, "only {examples} examples found");
    }

    #[test]
    fn errors_name_the_key() {
        assert!(error("capacity = 0", &[]).contains("`capacity`: must be between 1 and 1024"));
        assert!(error("capacity = \"x\"", &[]).contains("capacity"));
        assert!(error("capcity = 2", &[]).contains("capcity"));
        assert!(error("listen = \"localhost\"", &[]).contains("`listen`"));
        assert!(error("[keepalive]\ninterval = \"soon\"", &[]).contains("interval"));
        assert!(error("[keepalive]\ntimeout = \"1ms\"", &[]).contains("`keepalive.timeout`"));
        assert!(error("[consumers.\"a b\"]\nkind = \"tts\"", &[]).contains("`consumers.a b`"));
        assert!(error("[consumers.x]\nkind = \"gpu\"", &[]).contains("gpu"));
        assert!(error("listen = \"\"", &[]).contains("at least one place to listen"));
        assert!(error("", &[("GPULEASE__CAPACITY", "lots")]).contains("capacity"));
        assert!(error("[gpu]\nsource = \"cuda\"", &[]).contains("cuda"));
        assert!(error("[consumers.x]\nunload = \"please\"", &[]).contains("`consumers.x.unload`"));
        assert!(error("[consumers.x]\nunload = { command = [] }", &[]).contains("is empty"));
        assert!(error("[auth]\nsocket_mode = \"rw\"", &[]).contains("`auth.socket_mode`"));
        assert!(error("[metrics]\nlisten = \":9\"", &[]).contains("`metrics.listen`"));
        assert!(error("[metrics]\nport = 9", &[]).contains("port"));
        assert!(error("[auth]\ntls_cert = \"a.pem\"", &[]).contains("tls_key"));
        let both = "[consumers.x]\ntoken = \"t\"\ntoken_file = \"/f\"";
        assert!(error(both, &[]).contains("not both"));
        let shared = "[auth]\nadmin_token = \"t\"\n[consumers.x]\ntoken = \"t\"";
        assert!(error(shared, &[]).contains("share a token"));
        let config = load("[auth]\nadmin_token = \"hunter2\"", &[]).unwrap();
        assert!(
            !format!("{config:?}").contains("hunter2"),
            "a token was printed"
        );
        assert!(error("[consumers.x]\nmatch = {}", &[]).contains("`consumers.x.match`"));
        assert!(error("[gate]\nupstream = \"ftp://x\"", &[]).contains("`gate.upstream`"));
        assert!(error("[gate]\nupstream = \"http://h:1/api\"", &[]).contains("has a path"));
        assert!(error("[gate]\nlisten = \"here\"", &[]).contains("`gate.listen`"));
        assert!(error("[gate]\nport = 1", &[]).contains("port"));
        assert!(error("[consumers.x]\nmatch = { exe = \"\" }", &[]).contains("match.exe"));
        let not_hex = "[consumers.x]\nmatch = { container = \"web\" }";
        assert!(error(not_hex, &[]).contains("`consumers.x.match.container`"));
        assert!(error("[consumers.x]\nmatch = { pid = 7 }", &[]).contains("pid"));
        let group = "[auth]\nsocket_group = \"no-such-group-gpulease\"";
        assert!(error(group, &[]).contains("`auth.socket_group`: no group"));
        let numeric = load("[auth]\nsocket_group = \"4242\"", &[]).unwrap();
        assert_eq!(numeric.auth.socket_group.map(|g| g.gid), Some(4242));
        let tls = "[auth]\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"";
        assert!(error(tls, &[]).contains("`auth.tls_cert`: cannot read /nonexistent/c.pem"));
        let missing = "[consumers.x]\ntoken_file = \"/nonexistent/token\"";
        assert!(error(missing, &[]).contains("`consumers.x.token_file`"));
    }
}
