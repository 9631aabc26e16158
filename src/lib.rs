//! gpulease: a broker that leases a shared GPU to its consumers, one
//! permit and one fitting request at a time.
//!
//! The library is the `gpulease` binary's: it exports [`run`], the command
//! line, and [`config`], the typed configuration (which the benchmark
//! uses for the broker's defaults). Everything else is private to the
//! crate. A Rust service that wants a lease uses the `gpulease-client`
//! crate (`clients/rust`). See `ARCHITECTURE.md` for the map of the modules
//! and their invariants.

mod app;
mod auth;
mod broker;
mod cli;
pub mod config;
mod core;
mod gate;
mod grpc;
mod incoming;
mod inventory;
mod logging;
mod matcher;
mod metrics;
mod notify;
mod pb;
mod peer;
mod reload;
mod server;
mod state;

mod tls;

pub use app::run;
