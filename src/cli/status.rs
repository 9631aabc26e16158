//! `gpulease status` and `gpulease watch`: a readable snapshot of the broker.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::time::Duration;

use crate::pb::v1 as pb;

use super::exit::Failure;
use super::{BrokerArg, ExitCode};

pub(super) async fn status(broker: &BrokerArg, json: bool) -> Result<ExitCode, Failure> {
    let mut client = broker.connect().await?;
    let snapshot = client.status(pb::StatusRequest {}).await?.into_inner();
    if json {
        let text = serde_json::to_string_pretty(&snapshot)
            .map_err(|e| Failure::new(ExitCode::SOFTWARE, format!("cannot write JSON: {e}")))?;
        println!("{text}");
    } else {
        print!("{}", render(&snapshot));
    }
    Ok(ExitCode::OK)
}

pub(super) async fn watch(broker: &BrokerArg) -> Result<ExitCode, Failure> {
    let mut client = broker.connect().await?;
    let mut snapshots = client
        .watch_status(pb::StatusRequest {})
        .await?
        .into_inner();
    let terminal = std::io::stdout().is_terminal();
    let mut stdout = std::io::stdout();
    loop {
        let snapshot = tokio::select! {
            next = snapshots.message() => match next? {
                Some(snapshot) => snapshot,
                None => return Err(Failure::new(ExitCode::UNAVAILABLE, "the broker ended the watch")),
            },
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::OK),
        };
        let text = render(&snapshot);
        let written = if terminal {
            // Home the cursor and clear the screen, then draw.
            write!(stdout, "\x1b[H\x1b[2J{text}")
        } else {
            writeln!(stdout, "{text}")
        };
        if written.and_then(|()| stdout.flush()).is_err() {
            // The reader went away (a closed pipe): nothing more to do.
            return Ok(ExitCode::OK);
        }
    }
}

/// The human form of a snapshot: a summary, then tables.
pub(super) fn render(s: &pb::StatusResponse) -> String {
    let mut out = String::new();
    let broker = s.broker.clone().unwrap_or_default();
    let _ = writeln!(
        out,
        "gpulease {}  epoch {:x}  up {}{}",
        broker.version,
        broker.epoch,
        short(broker.uptime_ms),
        if broker.shutting_down {
            "  SHUTTING DOWN"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "capacity {}  in flight {}  queued {}  grants {}  last wait {}  last hold {}  oldest queued {}",
        s.capacity,
        s.in_flight,
        s.queue_depth,
        s.total_grants,
        short(s.last_wait_ms),
        short(s.last_hold_ms),
        if s.queue_depth == 0 {
            "-".to_owned()
        } else {
            short(s.oldest_queued_ms)
        },
    );

    let mut holders = vec![row(["LEASE", "CONSUMER", "TOKEN", "HELD", "PID", "VRAM"])];
    holders.extend(s.holders.iter().map(|h| {
        row([
            &h.lease_id,
            &h.consumer,
            &h.fencing_token.to_string(),
            &short(h.held_ms),
            &pid(h.client_pid),
            &mib(h.vram_mib),
        ])
    }));
    section(&mut out, "holders", holders);

    let mut waiters = vec![row(["POS", "CONSUMER", "WAITING", "PID", "VRAM"])];
    waiters.extend(s.waiters.iter().map(|w| {
        row([
            &w.position.to_string(),
            &w.consumer,
            &short(w.waiting_ms),
            &pid(w.client_pid),
            &mib(w.vram_mib),
        ])
    }));
    section(&mut out, "waiters", waiters);

    let mut consumers = vec![row([
        "CONSUMER",
        "KIND",
        "VRAM",
        "GRANTS",
        "LAST ACTIVE",
        "NOW",
    ])];
    consumers.extend(s.consumers.iter().map(|c| {
        let kind = pb::ConsumerKind::try_from(c.kind)
            .map(kind_name)
            .unwrap_or("?");
        let now = match (c.holding, c.waiting) {
            (true, _) => "holding".to_owned(),
            (false, 0) => "-".to_owned(),
            (false, n) => format!("waiting ({n})"),
        };
        let last = if c.last_active_ms_ago == 0 && c.grants == 0 && !c.holding && c.waiting == 0 {
            "never".to_owned()
        } else {
            format!("{} ago", short(c.last_active_ms_ago))
        };
        row([
            &c.name,
            kind,
            &mib(c.vram_mib),
            &c.grants.to_string(),
            &last,
            &now,
        ])
    }));
    section(&mut out, "consumers", consumers);

    render_gpus(&mut out, s);

    if let Some(e) = &s.ended {
        let _ = writeln!(
            out,
            "\nended: released {}  half-closed {}  disconnected {}  revoked {}  withdrawn {}  expired {}",
            e.released, e.half_closed, e.disconnected, e.revoked, e.withdrawn, e.expired
        );
    }
    out
}

/// The GPUs' memory, residents and processes without a lease; nothing for
/// a single GPU of unknown size without readings.
fn render_gpus(out: &mut String, s: &pb::StatusResponse) {
    let known = s.gpus.iter().any(|g| g.measured || g.total_mib > 0);
    if !known {
        return;
    }
    let mut gpus = vec![row([
        "GPU",
        "NAME",
        "USED",
        "FREE",
        "TOTAL",
        "HEADROOM",
        "WAITING FOR",
    ])];
    gpus.extend(s.gpus.iter().map(|g| {
        let name = if g.name.is_empty() { &g.uuid } else { &g.name };
        row([
            &g.index.to_string(),
            if name.is_empty() { "-" } else { name },
            &mib(g.used_mib),
            &mib(g.free_mib),
            &mib(g.total_mib),
            &format!("{} MiB", g.headroom_mib),
            if g.blocked_by.is_empty() {
                "-"
            } else {
                &g.blocked_by
            },
        ])
    }));
    section(out, &format!("gpus ({})", s.inventory), gpus);

    let mut residents = vec![row(["RESIDENT", "GPU", "FOOTPRINT", "IDLE", "UNLOAD"])];
    for g in &s.gpus {
        residents.extend(g.residents.iter().map(|r| {
            let state = match (r.unload_requested, r.unload_failed) {
                (_, true) => "did not free its memory",
                (true, false) => "asked",
                (false, false) => "-",
            };
            row([
                &r.consumer,
                &g.index.to_string(),
                &mib(r.footprint_mib),
                &short(r.idle_ms),
                state,
            ])
        }));
    }
    section(out, "residents", residents);

    let mut unleased = vec![row(["PID WITHOUT A LEASE", "GPU", "MEMORY"])];
    for g in &s.gpus {
        unleased.extend(
            g.unleased
                .iter()
                .map(|p| row([&p.pid.to_string(), &g.index.to_string(), &mib(p.used_mib)])),
        );
    }
    if unleased.len() > 1 {
        section(out, "unleased processes", unleased);
    }
    if let Some(e) = s.evictions.as_ref().filter(|e| e.requested > 0) {
        let _ = writeln!(
            out,
            "\nevictions: asked {}  completed {}  failed {}  last {} ({})",
            e.requested,
            e.completed,
            e.failed,
            if e.last_victim.is_empty() {
                "-"
            } else {
                &e.last_victim
            },
            short(e.last_unload_ms)
        );
    }
}

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

fn section(out: &mut String, title: &str, rows: Vec<Vec<String>>) {
    let _ = writeln!(out);
    if rows.len() == 1 {
        let _ = writeln!(out, "no {title}");
        return;
    }
    let columns = rows[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let mut line = String::new();
        for (cell, width) in r.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

fn kind_name(kind: pb::ConsumerKind) -> &'static str {
    match kind {
        pb::ConsumerKind::Unspecified => "-",
        pb::ConsumerKind::Tts => "tts",
        pb::ConsumerKind::Llm => "llm",
        pb::ConsumerKind::Image => "image",
        pb::ConsumerKind::Other => "other",
    }
}

fn pid(pid: u32) -> String {
    if pid == 0 {
        "-".to_owned()
    } else {
        pid.to_string()
    }
}

fn mib(mib: u64) -> String {
    if mib == 0 {
        "-".to_owned()
    } else {
        format!("{mib} MiB")
    }
}

/// A duration in milliseconds, rounded to what a person reads at a glance.
pub(super) fn short(ms: u64) -> String {
    let d = Duration::from_millis(ms);
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        let secs = d.as_secs();
        if secs < 3600 {
            format!("{}m{:02}s", secs / 60, secs % 60)
        } else {
            format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(short(0), "0ms");
        assert_eq!(short(999), "999ms");
        assert_eq!(short(1_250), "1.2s");
        assert_eq!(short(61_000), "1m01s");
        assert_eq!(short(3_723_000), "1h02m");
    }

    #[test]
    fn renders_holders_waiters_and_consumers() {
        let snapshot = pb::StatusResponse {
            capacity: 1,
            in_flight: 1,
            queue_depth: 1,
            total_grants: 3,
            holders: vec![pb::Holder {
                lease_id: "abc-3".into(),
                consumer: "mvoice".into(),
                fencing_token: 3,
                held_ms: 1500,
                client_pid: 42,
                vram_mib: 4000,
                ..Default::default()
            }],
            waiters: vec![pb::Waiter {
                consumer: "comfyui".into(),
                position: 1,
                waiting_ms: 200,
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = render(&snapshot);
        assert!(
            text.contains("capacity 1  in flight 1  queued 1  grants 3"),
            "{text}"
        );
        assert!(
            text.contains("abc-3  mvoice    3      1.5s  42   4000 MiB"),
            "{text}"
        );
        assert!(text.contains("1    comfyui   200ms"), "{text}");
        assert!(text.contains("no consumers"), "{text}");
    }
}
