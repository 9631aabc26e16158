//! The broker's configuration: one typed struct, loaded once from the
//! embedded defaults, an optional TOML file and `GPULEASE__*` environment
//! variables, and validated in full before anything is bound.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::core::{ConsumerKind, ConsumerProfile, validate_consumer_name};

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
    /// HTTP/2 keepalive ping interval. Default: 5 s.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered. Default: 5 s.
    pub keepalive_timeout: Duration,
    /// The configured consumers, by name.
    pub consumers: Vec<ConsumerProfile>,
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
            .source(env.map(|vars| vars.into_iter().collect()));
        let raw: RawConfig = builder.add_source(env).build()?.try_deserialize()?;
        raw.validate()
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
    keepalive: RawKeepalive,
    #[serde(default)]
    consumers: BTreeMap<String, RawConsumer>,
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

fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
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
        let mut consumers = Vec::with_capacity(self.consumers.len());
        for (name, consumer) in self.consumers {
            validate_consumer_name(&name)
                .map_err(|e| invalid(&format!("consumers.{name}"), e.to_string()))?;
            consumers.push(ConsumerProfile {
                name,
                kind: consumer.kind.into(),
                vram_mib: consumer.vram_mib,
                coexist: consumer.coexist,
            });
        }
        Ok(Config {
            listen,
            socket,
            capacity: self.capacity,
            strict_consumers: self.strict_consumers,
            max_hold: (!self.max_hold.is_zero()).then_some(self.max_hold),
            shutdown_grace: self.shutdown_grace,
            keepalive_interval: self.keepalive.interval,
            keepalive_timeout: self.keepalive.timeout,
            consumers,
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
        assert_eq!(
            config.consumers,
            [
                ConsumerProfile {
                    name: "mvoice".into(),
                    kind: ConsumerKind::Tts,
                    vram_mib: 3000,
                    coexist: true
                },
                ConsumerProfile {
                    name: "ollama".into(),
                    kind: ConsumerKind::Llm,
                    vram_mib: 0,
                    coexist: false
                },
            ]
        );
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
    }
}
