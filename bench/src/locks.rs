//! The other ways to hand a lock from one process to the next, measured as
//! baselines: `flock(2)` (the kernel's limit on one host) and an etcd
//! lease-backed lock (what a cluster lock service costs).
//!
//! Both workers are plain blocking code: no runtime, nothing between the
//! clock and the system call.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::fcntl::{Flock, FlockArg};
use serde_json::{Value, json};

use crate::jobs::{Latencies, LockEvent, LockEvents};
use gpulease_testkit::clock::now_ns;

/// How long one etcd call may block, a lock included.
const ETCD_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The TTL of the etcd lease that backs the lock; a worker that dies lets
/// go of the lock after it.
const ETCD_LEASE_TTL_S: u64 = 60;

/// Takes and gives back an exclusive `flock` on `path` `iterations` times.
/// Holding for `hold_us` lets the other worker block in `flock` first;
/// staying away for `gap_us` after giving it back lets that waiter, not
/// this process, take it next (`flock` is not fair).
pub(crate) fn flock(
    path: &Path,
    iterations: usize,
    hold_us: u64,
    gap_us: u64,
) -> Result<LockEvents> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut events = Vec::with_capacity(2 * iterations);
    for _ in 0..iterations {
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| errno)
            .context("flock(LOCK_EX) failed")?;
        events.push(LockEvent {
            taken: true,
            at_ns: now_ns(),
        });
        std::thread::sleep(Duration::from_micros(hold_us));
        events.push(LockEvent {
            taken: false,
            at_ns: now_ns(),
        });
        file = lock
            .unlock()
            .map_err(|(_, errno)| errno)
            .context("flock(LOCK_UN) failed")?;
        std::thread::sleep(Duration::from_micros(gap_us));
    }
    Ok(LockEvents { events })
}

/// Takes and gives back etcd's lock `name` `iterations` times, holding it
/// `hold_ms` each time. etcd's lock is FIFO (by revision), so the other
/// worker, which has waited since it last gave the lock back, takes it next.
pub(crate) fn etcd_handoff(
    endpoint: &str,
    name: &str,
    iterations: usize,
    hold_ms: u64,
) -> Result<LockEvents> {
    let mut etcd = Etcd::connect(endpoint)?;
    let lease = etcd.grant_lease()?;
    let mut events = Vec::with_capacity(2 * iterations);
    for _ in 0..iterations {
        let key = etcd.lock(name, &lease)?;
        events.push(LockEvent {
            taken: true,
            at_ns: now_ns(),
        });
        std::thread::sleep(Duration::from_millis(hold_ms));
        events.push(LockEvent {
            taken: false,
            at_ns: now_ns(),
        });
        etcd.unlock(&key)?;
    }
    etcd.revoke_lease(&lease)?;
    Ok(LockEvents { events })
}

/// Uncontended etcd lock (`first`) and lock → unlock (`second`).
pub(crate) fn etcd_cycle(
    endpoint: &str,
    name: &str,
    iterations: usize,
    warmup: usize,
) -> Result<Latencies> {
    let mut etcd = Etcd::connect(endpoint)?;
    let lease = etcd.grant_lease()?;
    let mut samples = Latencies::default();
    for i in 0..warmup + iterations {
        let start = now_ns();
        let key = etcd.lock(name, &lease)?;
        let locked = now_ns();
        etcd.unlock(&key)?;
        let unlocked = now_ns();
        if i >= warmup {
            samples.first.push(locked - start);
            samples.second.push(unlocked - start);
        }
    }
    etcd.revoke_lease(&lease)?;
    Ok(samples)
}

/// Whether etcd at `endpoint` says it is healthy.
pub(crate) fn etcd_healthy(endpoint: &str) -> bool {
    let Ok(mut etcd) = Etcd::connect(endpoint) else {
        return false;
    };
    etcd.call("GET", "/health", None)
        .is_ok_and(|health| health["health"] == "true")
}

/// etcd's v3 API through its JSON gateway, over one HTTP/1.1 connection:
/// no gRPC stubs for etcd are needed, and the lock calls are the same.
struct Etcd {
    stream: BufReader<TcpStream>,
    host: String,
}

impl Etcd {
    fn connect(endpoint: &str) -> Result<Self> {
        let stream = TcpStream::connect(endpoint)
            .with_context(|| format!("cannot connect to etcd at {endpoint}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(ETCD_CALL_TIMEOUT))?;
        stream.set_write_timeout(Some(ETCD_CALL_TIMEOUT))?;
        Ok(Self {
            stream: BufReader::new(stream),
            host: endpoint.to_owned(),
        })
    }

    fn grant_lease(&mut self) -> Result<String> {
        let lease = self.call(
            "POST",
            "/v3/lease/grant",
            Some(json!({ "TTL": ETCD_LEASE_TTL_S })),
        )?;
        id_string(&lease["ID"]).context("etcd granted a lease without an ID")
    }

    fn revoke_lease(&mut self, lease: &str) -> Result<()> {
        self.call("POST", "/v3/lease/revoke", Some(json!({ "ID": lease })))?;
        Ok(())
    }

    /// Blocks until the lock is taken; returns the key that holds it.
    fn lock(&mut self, name: &str, lease: &str) -> Result<String> {
        let locked = self.call(
            "POST",
            "/v3/lock/lock",
            Some(json!({ "name": base64(name.as_bytes()), "lease": lease })),
        )?;
        locked["key"]
            .as_str()
            .map(str::to_owned)
            .context("etcd answered a lock without a key")
    }

    fn unlock(&mut self, key: &str) -> Result<()> {
        self.call("POST", "/v3/lock/unlock", Some(json!({ "key": key })))?;
        Ok(())
    }

    fn call(&mut self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.stream.get_mut().write_all(request.as_bytes())?;
        let (status, body) = self.response()?;
        if status != 200 {
            bail!("etcd answered {path} with HTTP {status}: {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("etcd's answer to {path} is not JSON"))
    }

    /// Reads one response: its status and body (by length or chunked).
    fn response(&mut self) -> Result<(u16, String)> {
        let mut line = String::new();
        self.stream.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("not an HTTP status line: {line:?}"))?;
        let mut length = None;
        let mut chunked = false;
        for _ in 0..100 {
            line.clear();
            self.stream.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.parse::<usize>().ok();
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = value.eq_ignore_ascii_case("chunked");
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            for _ in 0..10_000 {
                line.clear();
                self.stream.read_line(&mut line)?;
                let size = usize::from_str_radix(line.trim(), 16)
                    .with_context(|| format!("bad chunk size {line:?}"))?;
                let mut chunk = vec![0; size + 2];
                self.stream.read_exact(&mut chunk)?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else {
            let length = length.context("an HTTP response without a length")?;
            body.resize(length, 0);
            self.stream.read_exact(&mut body)?;
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// etcd writes 64-bit ids as JSON strings; accept numbers too.
fn id_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Standard base64 with padding, as the gateway wants `bytes` fields.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_matches_rfc4648() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }
}
