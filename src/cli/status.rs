//! `gpulease status` and `gpulease watch`: a readable snapshot of the broker.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::time::Duration;

use crate::pb::v1 as pb;

use super::exit::Failure;
use super::{ExitCode, FleetArg};

pub(super) async fn status(fleet: &FleetArg, json: bool) -> Result<ExitCode, Failure> {
    if let [broker] = fleet.brokers.as_slice() {
        let snapshot = one_status(fleet, broker).await?;
        if json {
            crate::cli::out!("{}\n", to_json(&snapshot)?);
        } else {
            crate::cli::out!("{}", render(&snapshot));
        }
        return Ok(ExitCode::OK);
    }
    // Several hosts: ask them all at once, and show every answer, or why
    // there was none, in the order given.
    let mut asked = tokio::task::JoinSet::new();
    for (slot, broker) in fleet.brokers.iter().enumerate() {
        let fleet_broker = broker.clone();
        let credentials = fleet.credentials.clone();
        asked.spawn(async move {
            let answer = tokio::time::timeout(FLEET_PATIENCE, async {
                let mut client = credentials.connect(&fleet_broker).await?;
                Ok::<_, Failure>(
                    client
                        .status(pb::StatusRequest::default())
                        .await?
                        .into_inner(),
                )
            })
            .await
            .unwrap_or_else(|_| {
                Err(Failure::new(
                    ExitCode::UNAVAILABLE,
                    format!("no answer within {} s", FLEET_PATIENCE.as_secs()),
                ))
            });
            (slot, answer)
        });
    }
    let mut answers: Vec<Option<Result<pb::StatusResponse, Failure>>> =
        fleet.brokers.iter().map(|_| None).collect();
    while let Some(joined) = asked.join_next().await {
        if let Ok((slot, answer)) = joined {
            answers[slot] = Some(answer);
        }
    }
    let answers: Vec<Result<pb::StatusResponse, Failure>> = answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(Failure::new(ExitCode::SOFTWARE, "the query failed"))))
        .collect();
    let all_answered = answers.iter().all(Result::is_ok);
    if json {
        let hosts: Vec<serde_json::Value> = fleet
            .brokers
            .iter()
            .zip(&answers)
            .map(|(broker, answer)| match answer {
                Ok(snapshot) => serde_json::json!({ "broker": broker, "status": snapshot }),
                Err(failure) => serde_json::json!({ "broker": broker, "error": failure.message }),
            })
            .collect();
        crate::cli::out!("{}\n", to_json(&hosts)?);
    } else {
        let sections: Vec<(String, Result<String, String>)> = fleet
            .brokers
            .iter()
            .zip(&answers)
            .map(|(broker, answer)| {
                let body = match answer {
                    Ok(snapshot) => Ok(render(snapshot)),
                    Err(failure) => Err(failure.message.clone()),
                };
                (broker.clone(), body)
            })
            .collect();
        crate::cli::out!("{}", render_fleet(&sections));
    }
    // Every host is shown either way; the status says whether all answered.
    Ok(if all_answered {
        ExitCode::OK
    } else {
        ExitCode::UNAVAILABLE
    })
}

/// How long one host of several may take to answer `status`.
const FLEET_PATIENCE: Duration = Duration::from_secs(10);

/// How long `watch` waits before it tries an unreachable host again.
const RECONNECT_AFTER: Duration = Duration::from_secs(2);

async fn one_status(fleet: &FleetArg, broker: &str) -> Result<pb::StatusResponse, Failure> {
    let mut client = fleet.credentials.connect(broker).await?;
    Ok(client
        .status(pb::StatusRequest::default())
        .await?
        .into_inner())
}

fn to_json(value: &impl serde::Serialize) -> Result<String, Failure> {
    serde_json::to_string_pretty(value)
        .map_err(|e| Failure::new(ExitCode::SOFTWARE, format!("cannot write JSON: {e}")))
}

/// One section per host: a header line, then its status or the one line
/// that says why it could not be reached.
fn render_fleet(sections: &[(String, Result<String, String>)]) -> String {
    let mut out = String::new();
    for (i, (broker, body)) in sections.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = writeln!(out, "== {broker} ==");
        match body {
            Ok(text) => out.push_str(text),
            Err(why) => {
                let _ = writeln!(out, "unreachable: {why}");
            }
        }
    }
    out
}

pub(super) async fn watch(fleet: &FleetArg) -> Result<ExitCode, Failure> {
    if let [broker] = fleet.brokers.as_slice() {
        return watch_one(fleet, broker).await;
    }
    // One task per host follows its WatchStatus (and reconnects after a
    // failure); every update redraws all the sections.
    let (updates, mut received) = tokio::sync::mpsc::channel(16);
    let mut followers = tokio::task::JoinSet::new();
    for (slot, broker) in fleet.brokers.iter().enumerate() {
        followers.spawn(follow(
            slot,
            broker.clone(),
            fleet.credentials.clone(),
            updates.clone(),
        ));
    }
    drop(updates);
    let mut sections: Vec<(String, Result<String, String>)> = fleet
        .brokers
        .iter()
        .map(|b| (b.clone(), Err("connecting".to_owned())))
        .collect();
    let terminal = std::io::stdout().is_terminal();
    let mut stdout = std::io::stdout();
    loop {
        let (slot, body) = tokio::select! {
            update = received.recv() => match update {
                Some(update) => update,
                None => return Ok(ExitCode::OK),
            },
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::OK),
        };
        sections[slot].1 = body;
        if !redraw(&mut stdout, terminal, &render_fleet(&sections)) {
            return Ok(ExitCode::OK);
        }
    }
}

/// Follows one host's WatchStatus for [`watch`], sending each rendered
/// snapshot, or why there is none, until the receiver is gone.
async fn follow(
    slot: usize,
    broker: String,
    credentials: super::Credentials,
    updates: tokio::sync::mpsc::Sender<(usize, Result<String, String>)>,
) {
    loop {
        let failure = async {
            let mut client = credentials.connect(&broker).await?;
            let mut snapshots = client
                .watch_status(pb::StatusRequest::default())
                .await?
                .into_inner();
            while let Some(snapshot) = snapshots.message().await? {
                if updates.send((slot, Ok(render(&snapshot)))).await.is_err() {
                    return Ok(());
                }
            }
            Err(Failure::new(
                ExitCode::UNAVAILABLE,
                "the broker ended the watch",
            ))
        }
        .await;
        let Err(failure) = failure else { return };
        if updates.send((slot, Err(failure.message))).await.is_err() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(RECONNECT_AFTER) => {}
            () = updates.closed() => return,
        }
    }
}

async fn watch_one(fleet: &FleetArg, broker: &str) -> Result<ExitCode, Failure> {
    let mut client = fleet.credentials.connect(broker).await?;
    let mut snapshots = client
        .watch_status(pb::StatusRequest::default())
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
        if !redraw(&mut stdout, terminal, &render(&snapshot)) {
            return Ok(ExitCode::OK);
        }
    }
}

/// Draws `text` over the previous one on a terminal (home the cursor, clear
/// the screen), or appends it elsewhere. `false` once the reader went away
/// (a closed pipe): there is nothing more to do.
fn redraw(stdout: &mut std::io::Stdout, terminal: bool, text: &str) -> bool {
    let written = if terminal {
        write!(stdout, "\x1b[H\x1b[2J{text}")
    } else {
        writeln!(stdout, "{text}")
    };
    written.and_then(|()| stdout.flush()).is_ok()
}

/// The capacity over all GPUs, and per GPU where there are several (a
/// broker that does not say per GPU shows its one figure).
fn capacity(s: &pb::StatusResponse) -> String {
    if s.gpus.len() > 1 && s.capacity_per_gpu > 0 {
        format!("{} ({} per GPU)", s.total_capacity, s.capacity_per_gpu)
    } else {
        s.capacity.to_string()
    }
}

/// The human form of a snapshot: a summary, then tables.
pub(super) fn render(s: &pb::StatusResponse) -> String {
    let mut out = String::new();
    let broker = s.broker.clone().unwrap_or_default();
    let _ = writeln!(
        out,
        "gpulease {}  epoch {:x}  up {}{}{}",
        broker.version,
        broker.epoch,
        short(broker.uptime_ms),
        if broker.reloads > 0 {
            format!("  reloads {}", broker.reloads)
        } else {
            String::new()
        },
        if broker.shutting_down {
            "  SHUTTING DOWN"
        } else {
            ""
        }
    );
    if !broker.last_reload_error.is_empty() {
        let _ = writeln!(out, "last reload refused: {}", broker.last_reload_error);
    }
    let _ = writeln!(
        out,
        "capacity {}  in flight {}  queued {}  grants {}  last wait {}  last hold {}  oldest queued {}",
        capacity(s),
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

    let mut holders = vec![row([
        "LEASE", "CONSUMER", "TOKEN", "HELD", "PID", "VRAM", "PRIO", "",
    ])];
    holders.extend(s.holders.iter().map(|h| {
        row([
            &h.lease_id,
            &h.consumer,
            &h.fencing_token.to_string(),
            &short(h.held_ms),
            &pid(h.client_pid),
            &mib(h.vram_mib),
            &h.priority.to_string(),
            if h.preempt_requested {
                "asked to make way"
            } else {
                ""
            },
        ])
    }));
    section(&mut out, "holders", holders);

    let mut waiters = vec![row([
        "POS", "CONSUMER", "WAITING", "PID", "VRAM", "PRIO", "ESTIMATE",
    ])];
    waiters.extend(s.waiters.iter().map(|w| {
        row([
            &w.position.to_string(),
            &w.consumer,
            &short(w.waiting_ms),
            &pid(w.client_pid),
            &mib(w.vram_mib),
            &w.priority.to_string(),
            &estimate(w.estimated_wait_ms),
        ])
    }));
    section(&mut out, "waiters", waiters);
    // Status lists the head of a long queue only.
    if s.waiters_omitted > 0 {
        let _ = writeln!(out, "… and {} more waiting", s.waiters_omitted);
    }

    let mut consumers = vec![row([
        "CONSUMER",
        "KIND",
        "VRAM",
        "GRANTS",
        "LAST ACTIVE",
        "NOW",
        "PRIO",
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
            &if c.preemptible {
                format!("{} preemptible", c.priority)
            } else {
                c.priority.to_string()
            },
        ])
    }));
    section(&mut out, "consumers", consumers);

    render_gpus(&mut out, s);

    if let Some(e) = &s.ended {
        let _ = writeln!(
            out,
            "\nended: released {}  half-closed {}  disconnected {}  revoked {}  withdrawn {}  unclaimed {}  expired {}",
            e.released,
            e.half_closed,
            e.disconnected,
            e.revoked,
            e.withdrawn,
            e.unclaimed,
            e.expired
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
        "RESERVED FOR",
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
            if g.reserved_for.is_empty() {
                "-"
            } else {
                &g.reserved_for
            },
            if g.blocked_by.is_empty() {
                "-"
            } else {
                &g.blocked_by
            },
        ])
    }));
    section(out, &format!("gpus ({})", s.inventory), gpus);

    let mut residents = vec![row([
        "RESIDENT", "GPU", "KEEPS", "PEAK", "IDLE", "UNLOAD", "PID", "FOUND BY",
    ])];
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
                &mib(r.peak_mib),
                &short(r.idle_ms),
                state,
                &pid(r.pid),
                if r.attribution.is_empty() {
                    "-"
                } else {
                    &r.attribution
                },
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

/// An estimated wait: `~40.0s`, or `-` when unknown.
fn estimate(ms: u64) -> String {
    if ms == 0 {
        "-".to_owned()
    } else {
        format!("~{}", short(ms))
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
    fn capacity_says_per_gpu_where_there_are_several() {
        let gpu = |index| pb::Gpu {
            index,
            ..pb::Gpu::default()
        };
        let two = pb::StatusResponse {
            capacity: 4,
            capacity_per_gpu: 2,
            total_capacity: 4,
            gpus: vec![gpu(0), gpu(1)],
            ..pb::StatusResponse::default()
        };
        assert!(render(&two).contains("capacity 4 (2 per GPU)  in flight"));
        let one = pb::StatusResponse {
            gpus: vec![gpu(0)],
            ..two.clone()
        };
        assert!(render(&one).contains("capacity 4  in flight"));
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
                priority: 5,
                estimated_wait_ms: 40_000,
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
        assert!(text.contains("5     ~40.0s"), "{text}");
        assert!(text.contains("no consumers"), "{text}");
    }
}
