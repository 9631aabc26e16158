//! Takes one lease from a broker, prints its fencing token, and releases it.
//!
//! ```text
//! cargo run -p gpulease-client --example lease -- [ADDR [CONSUMER]]
//! ```
//!
//! `ADDR` defaults to `$GPULEASE_BROKER`, then `127.0.0.1:50051`;
//! `CONSUMER` to `$GPULEASE_CONSUMER`, then `example`.

use gpulease_client::{Client, DEFAULT_BROKER};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let address = args
        .next()
        .or_else(|| std::env::var("GPULEASE_BROKER").ok())
        .unwrap_or_else(|| DEFAULT_BROKER.to_owned());
    let consumer = args
        .next()
        .or_else(|| std::env::var("GPULEASE_CONSUMER").ok())
        .unwrap_or_else(|| "example".to_owned());

    let lease = Client::connect(&address)
        .await?
        .lease(consumer)
        .vram_mib(0)
        .on_queued(|queued| eprintln!("waiting: position {}", queued.position))
        .acquire()
        .await?;
    println!(
        "granted lease {} on GPU {} (CUDA_VISIBLE_DEVICES={}), fencing token {}",
        lease.lease_id(),
        lease.gpu(),
        lease.cuda_visible_devices(),
        lease.token()
    );
    lease.release().await?;
    println!("released");
    Ok(())
}
