//! A Rust client for gpulease, the GPU lease broker: connect to a broker,
//! take a lease, and hold it as a guard that ends the lease when dropped.
//!
//! ```no_run
//! use gpulease_client::Client;
//!
//! # async fn example() -> Result<(), gpulease_client::Error> {
//! let lease = Client::connect("127.0.0.1:50051")
//!     .await?
//!     .lease("mvoice")
//!     .vram_mib(4000)
//!     .acquire()
//!     .await?;
//! println!("GPU {} is ours, fencing token {}", lease.gpu(), lease.token());
//! tokio::select! {
//!     lost = lease.lost() => eprintln!("stopping: {lost}"),
//!     () = do_the_work(lease.token()) => lease.release().await?,
//! }
//! # Ok(())
//! # }
//! # async fn do_the_work(_token: u64) {}
//! ```
//!
//! - [`Client::connect`] and [`Client::connect_with`] reach a broker over
//!   TCP (`HOST:PORT`, `https://HOST:PORT` for TLS), or a Unix socket
//!   (`unix:/run/gpulease/gpulease.sock`), with a bearer token and client
//!   certificates from [`ConnectOptions`].
//! - [`Client::lease`] returns a [`LeaseBuilder`] with a method for every
//!   field of the proto's `Acquire`, and callbacks for the queue position
//!   while waiting and for the broker's request to make way while held.
//! - A [`Lease`] ends when it is dropped, or by [`Lease::release`], which
//!   waits for the broker's word; [`Lease::lost`] resolves when the broker
//!   ends it instead.
//! - The other RPCs (status, watch, revoke, reload, residency) are the
//!   generated stub's, reached through the `Client`; every message type is in
//!   [`pb`].
//!
//! Every async method documents what cancelling it (dropping its future)
//! does. The crate needs a Tokio runtime.

#![deny(missing_docs)]

mod connect;
mod error;
mod lease;
pub mod pb;

pub use connect::{
    BearerToken, Client, ConnectError, ConnectOptions, DEFAULT_BROKER, GrpcClient, connect,
    connect_with,
};
pub use error::{Error, Lost};
pub use lease::{Lease, LeaseBuilder};
