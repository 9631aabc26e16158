//! gpulease: a broker that leases a shared GPU to one consumer at a time.
//!
//! See `ARCHITECTURE.md` for the map of the modules and their invariants.

mod app;
mod auth;
mod broker;
pub mod cli;
pub mod config;
mod core;
pub mod gate;
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
