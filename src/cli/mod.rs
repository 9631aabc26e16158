//! The `gpulease` command line: `serve` runs the broker; `status`, `watch`
//! and `run` are its clients.

/// `eprintln!` that never panics: a closed stderr must not stop, say,
/// `gpulease run` from stopping its command after the lease was lost.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
pub(crate) use say;

/// `print!` that never panics: `gpulease status | head -1` ends quietly.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}
pub(crate) use out;

mod exit;
mod gate;
mod reload;
mod revoke;
mod run;
mod status;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

pub(crate) use exit::ExitCode;
pub(crate) use run::RunArgs;

use gpulease_client::DEFAULT_BROKER;

/// A GPU lease broker: per-GPU queues, memory admission and priorities over gRPC.
#[derive(Debug, Parser)]
#[command(name = "gpulease", version, about, long_about = None)]
pub(crate) struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the broker (on its embedded defaults unless configured).
    Serve(ServeArgs),
    /// Show who holds the GPU, who waits, and the statistics (of several brokers with several --broker).
    Status(StatusArgs),
    /// Show the status live, redrawn on every change (of several brokers with several --broker).
    Watch(FleetArg),
    /// Hold a lease while a command runs: gpulease run --consumer NAME -- CMD ARGS...
    Run(RunArgs),
    /// End a held lease on an operator's behalf (admin token or the socket's owner).
    Revoke(revoke::RevokeArgs),
    /// Make the broker re-read its configuration file (as SIGHUP does); exit 78 if it is invalid.
    Reload(BrokerArg),
    /// An HTTP/1.1 gate: hold one lease around the requests to a server that cannot take one.
    Gate(gate::GateArgs),
}

/// Options of `gpulease serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// TOML configuration file; the embedded defaults fill in what it omits.
    #[arg(long, env = "GPULEASE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Load and validate the configuration, print it, and exit.
    #[arg(long)]
    pub check: bool,
    /// Print the embedded defaults (a commented TOML file) and exit.
    #[arg(long)]
    pub print_defaults: bool,
    /// Start over after a damaged or lost state file: hand out tokens above
    /// a floor taken from the wall clock (microseconds since 1970), which
    /// is above every earlier token unless the clock was set back.
    #[arg(long)]
    pub reset_state: bool,
}

/// Where the broker is, and how to prove who we are.
#[derive(Debug, Args)]
pub(crate) struct BrokerArg {
    /// The broker: HOST:PORT, http://HOST:PORT, https://HOST:PORT or unix:/PATH.
    #[arg(long, env = "GPULEASE_BROKER", default_value = DEFAULT_BROKER, value_name = "ADDR")]
    pub broker: String,
    #[command(flatten)]
    credentials: Credentials,
}

/// Several brokers (one per host), and how to prove who we are to them.
#[derive(Debug, Args)]
pub(crate) struct FleetArg {
    /// A broker: HOST:PORT, http://HOST:PORT, https://HOST:PORT or unix:/PATH. Repeat it, or separate addresses with commas, to show several hosts.
    #[arg(
        long = "broker",
        env = "GPULEASE_BROKER",
        default_value = DEFAULT_BROKER,
        value_name = "ADDR",
        value_delimiter = ','
    )]
    pub brokers: Vec<String>,
    #[command(flatten)]
    credentials: Credentials,
}

/// How to prove who we are: the same to every broker named.
#[derive(Clone, Debug, Args)]
pub(crate) struct Credentials {
    /// Bearer token to send (prefer --token-file or GPULEASE_TOKEN: arguments are visible to others).
    #[arg(
        long,
        env = "GPULEASE_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// File holding the bearer token.
    #[arg(
        long,
        env = "GPULEASE_TOKEN_FILE",
        value_name = "FILE",
        conflicts_with = "token"
    )]
    pub token_file: Option<PathBuf>,
    /// CA bundle (PEM) that signed the broker's certificate; implies TLS.
    #[arg(long, env = "GPULEASE_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), for mutual TLS.
    #[arg(long, env = "GPULEASE_CERT", value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client certificate's key (PEM), for mutual TLS.
    #[arg(long, env = "GPULEASE_KEY", value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
}

impl BrokerArg {
    /// Connects as these options say.
    pub(crate) async fn connect(&self) -> Result<gpulease_client::Client, exit::Failure> {
        self.credentials.connect(&self.broker).await
    }

    /// Reads the token from `file`, unless a token or a token file was
    /// given already.
    pub(crate) fn set_token_file(&mut self, file: PathBuf) {
        if self.credentials.token.is_none() && self.credentials.token_file.is_none() {
            self.credentials.token_file = Some(file);
        }
    }
}

impl Credentials {
    /// Connects to `broker` with these credentials.
    pub(crate) async fn connect(
        &self,
        broker: &str,
    ) -> Result<gpulease_client::Client, exit::Failure> {
        let token = match (&self.token, &self.token_file) {
            (Some(token), _) => Some(token.clone()),
            (None, Some(file)) => Some(std::fs::read_to_string(file).map_err(|e| {
                exit::Failure::new(
                    ExitCode::USAGE,
                    format!("cannot read the token file {}: {e}", file.display()),
                )
            })?),
            (None, None) => None,
        };
        let options = gpulease_client::ConnectOptions {
            token,
            ca: self.ca.clone(),
            identity: self.cert.clone().zip(self.key.clone()),
        };
        Ok(gpulease_client::connect_with(broker, &options).await?)
    }
}

/// Options of `gpulease status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    brokers: FleetArg,
    /// Print the snapshot as JSON (the proto's JSON form).
    #[arg(long)]
    json: bool,
}

/// Runs a client subcommand.
pub(crate) async fn run_client(command: Command) -> ExitCode {
    let result = match command {
        Command::Status(args) => status::status(&args.brokers, args.json).await,
        Command::Watch(args) => status::watch(&args).await,
        Command::Run(args) => run::run(args).await,
        Command::Revoke(args) => revoke::revoke(args).await,
        Command::Reload(args) => reload::reload(&args).await,
        Command::Gate(args) => gate::gate(args).await,
        Command::Serve(_) => unreachable!("serve is not a client command"),
    };
    match result {
        Ok(code) => code,
        Err(failure) => {
            crate::cli::say!("gpulease: {}", failure.message);
            failure.code
        }
    }
}

/// Parses a duration such as `30s`, `2m` or `1h30m`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (try 30s, 5m or 1h)"))
}
