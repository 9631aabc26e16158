//! The broker's configuration: one typed struct, loaded once from the
//! embedded defaults, an optional TOML file and `GPULEASE__*` environment
//! variables, and validated in full before anything is bound.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::core::ConsumerProfile;
use crate::matcher::ProcessMatcher;

mod raw;
#[cfg(test)]
mod tests;

use raw::RawConfig;
pub(crate) use raw::{check_upstream, invalid};

/// The embedded defaults, as TOML; `gpulease serve --print-defaults` shows it.
pub const DEFAULTS: &str = include_str!("../defaults.toml");

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
