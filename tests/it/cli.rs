//! The `gpulease` command line against a real broker.

use std::process::{Output, Stdio};

use tokio::process::Command;

use crate::support::{BIN, Broker, Call, acquire, assert_idle};

async fn gpulease(broker: &Broker, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("GPULEASE_BROKER", &broker.addr)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn run_holds_the_lease_exactly_as_long_as_its_command() {
    let broker = Broker::start().await;
    let inside = broker.path("inside.json");
    // The command looks at the broker's status while it runs.
    let script = format!(
        "{BIN} status --json > {}; echo \"$GPULEASE_LEASE_ID $GPULEASE_FENCING_TOKEN\"; exit 3",
        inside.display()
    );
    let output = gpulease(
        &broker,
        &["run", "--consumer", "job", "--", "sh", "-c", &script],
    )
    .await;
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let (lease_id, token) = stdout.trim().split_once(' ').unwrap();

    let inside: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&inside).unwrap()).unwrap();
    assert_eq!(inside["in_flight"], 1);
    assert_eq!(inside["holders"][0]["consumer"], "job");
    assert_eq!(inside["holders"][0]["lease_id"], lease_id);
    assert_eq!(inside["holders"][0]["fencing_token"], token);

    // Released when the command exited, before `gpulease run` returned.
    let after = broker.status().await;
    assert_eq!(after.in_flight, 0);
    assert_eq!(after.ended.unwrap().released, 1);
}

#[tokio::test]
async fn run_waits_for_the_holder_and_reports_a_killed_command() {
    let broker = Broker::start().await;
    let mut holder = Call::open(&broker, acquire("holder")).await.unwrap();
    holder.granted().await;
    let run = tokio::spawn({
        let addr = broker.addr.clone();
        async move {
            Command::new(BIN)
                .args(["run", "--broker", &addr, "--consumer", "second", "--"])
                .args(["sh", "-c", "kill -TERM $$"])
                .stdin(Stdio::null())
                .output()
                .await
                .unwrap()
        }
    });
    broker
        .wait_for("gpulease run waiting", |s| s.queue_depth == 1)
        .await;
    holder.release().await;
    let output = run.await.unwrap();
    // 128 + SIGTERM, as a shell reports it.
    assert_eq!(output.status.code(), Some(143), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("waiting for the GPU: position 1 of 1, held by holder"),
        "{stderr}"
    );
    assert_idle(&broker).await;
}

#[tokio::test]
async fn run_gives_up_after_max_wait() {
    let broker = Broker::start().await;
    let mut holder = Call::open(&broker, acquire("holder")).await.unwrap();
    holder.granted().await;
    let output = gpulease(
        &broker,
        &[
            "run",
            "--consumer",
            "late",
            "--max-wait",
            "100ms",
            "--",
            "true",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(75), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("DeadlineExceeded"));
    holder.release().await;
    assert_idle(&broker).await;
}

#[tokio::test]
async fn run_reports_a_missing_command_and_releases() {
    let broker = Broker::start().await;
    let output = gpulease(
        &broker,
        &["run", "--consumer", "x", "--", "/nonexistent/cmd"],
    )
    .await;
    assert_eq!(output.status.code(), Some(127), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("not found"));
    assert_idle(&broker).await;
    assert_eq!(broker.status().await.ended.unwrap().released, 1);
}

#[tokio::test]
async fn run_stops_the_command_when_the_lease_is_revoked() {
    let mut broker = Broker::start().await;
    let child = Command::new(BIN)
        .args(["run", "--broker", &broker.addr, "--consumer", "long", "--"])
        .args(["sleep", "600"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    broker
        .wait_for("the command holding the lease", |s| s.in_flight == 1)
        .await;
    assert!(broker.terminate().await.success());
    let output = child.wait_with_output().await.unwrap();
    assert_eq!(output.status.code(), Some(143), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("revoked") && stderr.contains("stopping the command"),
        "{stderr}"
    );
}

#[tokio::test]
async fn client_commands_explain_an_unreachable_broker() {
    let output = Command::new(BIN)
        .args(["status", "--broker", "127.0.0.1:1"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(69));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach the broker at 127.0.0.1:1"),
        "{stderr}"
    );
}

#[tokio::test]
async fn status_prints_a_table() {
    let broker = Broker::start().await;
    let mut holder = Call::open(&broker, acquire("mvoice")).await.unwrap();
    holder.granted().await;
    let output = gpulease(&broker, &["status"]).await;
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("capacity 1  in flight 1  queued 0"), "{text}");
    assert!(text.contains("mvoice"), "{text}");
    assert!(text.contains("no waiters"), "{text}");
}

#[tokio::test]
async fn watch_prints_a_snapshot_on_every_change() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let broker = Broker::start().await;
    let mut watch = Command::new(BIN)
        .args(["watch", "--broker", &broker.addr])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut until = async |wanted: &str| {
        let found = tokio::time::timeout(crate::support::PATIENCE, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains(wanted) {
                    return;
                }
            }
            panic!("gpulease watch ended");
        })
        .await;
        assert!(found.is_ok(), "no line with {wanted:?}");
    };
    until("in flight 0  queued 0").await;
    let mut holder = Call::open(&broker, acquire("mvoice")).await.unwrap();
    holder.granted().await;
    until("in flight 1  queued 0").await;
    holder.release().await;
    until("released 1").await;
}

#[tokio::test]
async fn status_shows_several_brokers_one_section_each() {
    let (a, b) = (Broker::start().await, Broker::start().await);
    let mut holder = Call::open(&a, acquire("on-host-a")).await.unwrap();
    holder.granted().await;
    let mut waiter_b = Call::open(&b, acquire("on-host-b")).await.unwrap();
    waiter_b.granted().await;
    let output = Command::new(BIN)
        .args(["status", "--broker", &a.addr, "--broker", &b.addr])
        .env_remove("GPULEASE_BROKER")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{text}");
    let (section_a, section_b) = text
        .split_once(&format!("== {} ==", b.addr))
        .unwrap_or_else(|| panic!("no section for {}: {text}", b.addr));
    assert!(
        section_a.starts_with(&format!("== {} ==\n", a.addr)),
        "{text}"
    );
    assert!(section_a.contains("on-host-a") && !section_a.contains("on-host-b"));
    assert!(section_b.contains("on-host-b") && !section_b.contains("on-host-a"));

    // An unreachable one gets its line, the others still show, and the
    // exit status says that not all answered. Commas work too.
    let brokers = format!("{},127.0.0.1:1,{}", a.addr, b.addr);
    let output = Command::new(BIN)
        .args(["status", "--broker", &brokers])
        .env_remove("GPULEASE_BROKER")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    assert_eq!(output.status.code(), Some(69), "{text}");
    assert!(
        text.contains("== 127.0.0.1:1 ==\nunreachable: cannot reach the broker at 127.0.0.1:1"),
        "{text}"
    );
    assert!(
        text.contains("on-host-a") && text.contains("on-host-b"),
        "{text}"
    );

    // JSON: one entry per broker, in order.
    let output = Command::new(BIN)
        .args(["status", "--json", "--broker", &brokers])
        .env_remove("GPULEASE_BROKER")
        .output()
        .await
        .unwrap();
    let hosts: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(hosts[0]["broker"], a.addr.as_str());
    assert_eq!(hosts[0]["status"]["holders"][0]["consumer"], "on-host-a");
    assert!(hosts[1]["error"].as_str().unwrap().contains("127.0.0.1:1"));
    assert_eq!(hosts[2]["status"]["holders"][0]["consumer"], "on-host-b");
}

#[tokio::test]
async fn watch_follows_several_brokers() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let (a, b) = (Broker::start().await, Broker::start().await);
    let mut watch = Command::new(BIN)
        .args(["watch", "--broker", &a.addr, "--broker", "127.0.0.1:1"])
        .args(["--broker", &b.addr])
        .env_remove("GPULEASE_BROKER")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    // Reads redraws until one has every wanted piece.
    let mut until = async |wanted: &[&str]| {
        let found = tokio::time::timeout(crate::support::PATIENCE, async {
            let mut redraw = String::new();
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.starts_with(&format!("== {} ==", a.addr)) {
                    redraw.clear();
                }
                redraw.push_str(&line);
                redraw.push('\n');
                if wanted.iter().all(|w| redraw.contains(w)) {
                    return;
                }
            }
            panic!("gpulease watch ended");
        })
        .await;
        assert!(found.is_ok(), "no redraw with {wanted:?}");
    };
    let unreachable = "unreachable: cannot reach the broker at 127.0.0.1:1";
    until(&[unreachable, "in flight 0"]).await;
    let mut holder = Call::open(&b, acquire("on-host-b")).await.unwrap();
    holder.granted().await;
    until(&[unreachable, "on-host-b", "in flight 1"]).await;
}
