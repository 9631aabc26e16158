//! Holders that vanish: killed with SIGKILL, or frozen with SIGSTOP.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::support::{BIN, Broker, Call, acquire, signal};

/// A `gpulease run` child process holding the lease around `sleep`. The
/// sleep writes its pid to a file so that the test can clean it up.
async fn holder_process(broker: &Broker) -> (Child, i32) {
    let pid_file = broker.path("sleep.pid");
    let script = format!("echo $$ > {}; exec sleep 600", pid_file.display());
    let child = Command::new(BIN)
        .args([
            "run",
            "--quiet",
            "--consumer",
            "frozen",
            "--broker",
            &broker.addr,
        ])
        .args(["--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    broker
        .wait_for("the child holding the lease", |s| {
            s.holders.first().is_some_and(|h| h.consumer == "frozen")
        })
        .await;
    // The pid file is written by the command, which starts after the grant.
    let deadline = Instant::now() + crate::support::PATIENCE;
    let sleep_pid = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.trim().parse().ok())
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "the command never started");
        tokio::task::yield_now().await;
    };
    (child, sleep_pid)
}

fn kill_pid(pid: i32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
}

#[tokio::test]
async fn a_killed_holder_hands_over_within_a_second() {
    let broker = Broker::start().await;
    let (mut holder, sleep_pid) = holder_process(&broker).await;
    let mut waiter = Call::open(&broker, acquire("next")).await.unwrap();
    waiter.queued().await;

    let killed = Instant::now();
    signal(&holder, Signal::SIGKILL);
    waiter.granted().await;
    let handover = killed.elapsed();
    kill_pid(sleep_pid);
    holder.wait().await.unwrap();
    assert!(
        handover < Duration::from_secs(1),
        "hand-over took {handover:?}"
    );
    let status = broker.status().await;
    assert_eq!(status.ended.unwrap().disconnected, 1);
}

#[tokio::test]
async fn a_frozen_holder_loses_its_lease_within_the_keepalive_bound() {
    let broker = Broker::with_env(&[
        ("GPULEASE__KEEPALIVE__INTERVAL", "500ms"),
        ("GPULEASE__KEEPALIVE__TIMEOUT", "500ms"),
    ])
    .await;
    let (mut holder, sleep_pid) = holder_process(&broker).await;
    let mut waiter = Call::open(&broker, acquire("next")).await.unwrap();
    waiter.queued().await;

    let frozen = Instant::now();
    signal(&holder, Signal::SIGSTOP);
    waiter.granted().await;
    let detected = frozen.elapsed();
    signal(&holder, Signal::SIGKILL);
    signal(&holder, Signal::SIGCONT);
    kill_pid(sleep_pid);
    holder.wait().await.unwrap();
    // The bound is interval + timeout = 1 s; the generous margin only
    // guards against a loaded machine, the point is that it ends at all.
    assert!(
        detected < Duration::from_secs(10),
        "detected after {detected:?}"
    );
    let ended = broker.status().await.ended.unwrap();
    assert_eq!(ended.disconnected, 1, "{ended:?}");
}
