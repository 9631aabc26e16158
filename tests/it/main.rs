//! Integration tests: the real `gpulease` binary on loopback (or a Unix
//! socket), driven by real tonic clients and by child processes.
//!
//! One test binary with modules, so that it links once.

// `support` is shared by the modules of this one crate only.
#![allow(unreachable_pub)]

mod attribution;
mod auth;
mod cli;
mod client_crate;
mod core_purity;
mod deploy;
mod errors;
mod gate;
mod gpu;
mod hostile;
mod leases;
mod lifecycle;
mod liveness;
mod matchers;
mod metrics;
mod reload;
mod service;
mod sharing;
mod status;
mod support;
