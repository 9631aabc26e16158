//! gpulease: a broker that leases a shared GPU to one consumer at a time.
//!
//! See `ARCHITECTURE.md` for the map of the modules and their invariants.

mod app;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod client;
pub mod config;
pub mod core;
pub mod gate;
pub mod grpc;
pub mod incoming;
pub mod inventory;
pub mod logging;
pub mod matcher;
pub mod metrics;
pub mod notify;
pub mod pb;
pub mod peer;
pub mod reload;
pub mod server;
pub mod state;

mod tls;

pub use app::run;
