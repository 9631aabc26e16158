//! What gpulease's tests and benchmarks share: finding the binaries of this
//! build, starting the real `gpulease serve` (or a server that prints the
//! same lines) and reading the addresses it prints, and the one clock that
//! every process on the host reads alike.
//!
//! ```no_run
//! # async fn example() -> Result<(), gpulease_testkit::StartError> {
//! use gpulease_testkit::{Serve, cargo_bin};
//! let broker = Serve::gpulease(cargo_bin("gpulease"))
//!     .env("GPULEASE__CAPACITY", "2")
//!     .start()
//!     .await?;
//! println!("the broker listens on {}", broker.addr);
//! # Ok(())
//! # }
//! ```

pub mod clock;
mod server;

use std::path::PathBuf;

pub use server::{PATIENCE, Serve, Server, StartError, Stderr, signal, terminate};

/// The binary `name` of this build (`target/<profile>/NAME`), found from the
/// running test or benchmark, which lives in that directory or in its
/// `deps/`. Cargo hands a test the path of its own package's binaries only
/// (`CARGO_BIN_EXE_<name>`); this finds another package's, which must have
/// been built first (`cargo build --workspace --bins`, as `scripts/test`
/// does).
///
/// # Panics
/// When the binary is not there, saying how to build it.
pub fn cargo_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the running executable has a path");
    let mut dir = exe
        .parent()
        .expect("an executable is in a directory")
        .to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "no {} next to {}: build it first with `cargo build --workspace --bins`",
        bin.display(),
        exe.display()
    );
    bin
}
