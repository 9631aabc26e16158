//! Live reload: SIGHUP and `gpulease reload` re-read the file; tokens,
//! consumers and `max_hold` change while leases are held; a bad file
//! changes nothing.

use gpulease_client::pb::v1 as pb;
use gpulease_client::pb::v1::lease_event::Kind as EventKind;
use nix::sys::signal::Signal;
use tonic::Code;

use crate::support::{BIN, Broker, Call, Options, acquire, signal};

const BEFORE: &str = r#"
[auth]
admin_token = "admin-secret"

[consumers.a]
token = "old-token"
"#;

async fn client_with(broker: &Broker, token: &str) -> gpulease_client::Client {
    let options = gpulease_client::ConnectOptions {
        token: Some(token.to_owned()),
        ..Default::default()
    };
    gpulease_client::connect_with(&broker.addr, &options)
        .await
        .unwrap()
}

/// A broker on `config`.
async fn start(config: &str) -> Broker {
    Broker::start_with(Options {
        config: Some(config),
        ..Options::default()
    })
    .await
}

/// A call of `consumer` opened with the admin token, `admin-secret`.
async fn admin_call_result(broker: &Broker, consumer: &str) -> Result<Call, tonic::Status> {
    Call::open_with_client(client_with(broker, "admin-secret").await, acquire(consumer)).await
}

/// A call of `consumer` opened with the admin token, which must open.
async fn admin_call(broker: &Broker, consumer: &str) -> Call {
    admin_call_result(broker, consumer).await.unwrap()
}

/// Rewrites the broker's configuration file.
fn rewrite(broker: &Broker, config: &str) {
    let path = broker.path("gpulease.toml");
    let temporary = broker.path("gpulease.toml.new");
    std::fs::write(&temporary, config).unwrap();
    std::fs::rename(&temporary, &path).unwrap();
}

/// Waits until `n` reloads have been applied.
async fn wait_reloaded(broker: &Broker, n: u64) -> pb::StatusResponse {
    broker
        .wait_for(&format!("{n} reloads"), |s| {
            s.broker.as_ref().is_some_and(|b| b.reloads == n)
        })
        .await
}

#[tokio::test]
async fn sighup_rotates_a_token_and_the_held_lease_stays_held() {
    let broker = start(BEFORE).await;
    let mut held = Call::open_with_client(client_with(&broker, "old-token").await, acquire("a"))
        .await
        .unwrap();
    let granted = held.granted().await;

    rewrite(&broker, &BEFORE.replace("old-token", "new-token"));
    signal(&broker.child, Signal::SIGHUP);
    wait_reloaded(&broker, 1).await;

    // The old token is refused now; the new one works (it waits behind the
    // lease that is still held).
    let old = Call::open_with_client(client_with(&broker, "old-token").await, acquire("a")).await;
    assert_eq!(old.err().unwrap().code(), Code::Unauthenticated);
    let mut new = Call::open_with_client(client_with(&broker, "new-token").await, acquire("a"))
        .await
        .unwrap();
    new.queued().await;
    let status = broker.status().await;
    assert_eq!(status.holders.len(), 1);
    assert_eq!(status.holders[0].fencing_token, granted.fencing_token);
    assert_eq!(status.holders[0].lease_id, granted.lease_id);

    // The lease held across the reload is released as usual; the next one
    // is granted to the new token's holder.
    held.release().await;
    let next = new.granted().await;
    assert!(next.fencing_token > granted.fencing_token);
}

/// `gpulease reload` with the admin token; its exit status, stdout and
/// stderr.
async fn cli_reload(broker: &Broker, token: &str) -> (i32, String, String) {
    let output = tokio::process::Command::new(BIN)
        .args(["reload", "--broker", &broker.addr, "--token", token])
        .env_remove("GPULEASE_BROKER")
        .output()
        .await
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_bad_file_keeps_the_running_configuration_and_the_call_says_why() {
    let broker = start(BEFORE).await;
    let mut held = Call::open_with_client(client_with(&broker, "old-token").await, acquire("a"))
        .await
        .unwrap();
    held.granted().await;

    rewrite(&broker, &format!("capacity = 0\n{BEFORE}"));
    let (code, _, stderr) = cli_reload(&broker, "admin-secret").await;
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("`capacity`"), "{stderr}");
    assert!(stderr.contains("running one is kept"), "{stderr}");
    // A SIGHUP with the bad file does not kill the broker either; Status
    // says why the reload was refused.
    signal(&broker.child, Signal::SIGHUP);
    let status = broker.status().await;
    assert_eq!((status.capacity, status.in_flight), (1, 1));
    let info = status.broker.unwrap();
    assert_eq!(info.reloads, 0);
    assert!(info.last_reload_error.contains("`capacity`"), "{info:?}");
    // Only the operator may reload.
    let (code, _, stderr) = cli_reload(&broker, "old-token").await;
    assert_eq!(code, 77, "{stderr}");
    let denied = client_with(&broker, "old-token")
        .await
        .reload(pb::ReloadRequest {})
        .await;
    assert_eq!(denied.unwrap_err().code(), Code::PermissionDenied);

    // A good file: max_hold applies to the lease already held, and a key
    // that needs a restart is named and kept.
    rewrite(
        &broker,
        &format!("max_hold = \"1s\"\n[keepalive]\ninterval = \"1s\"\n{BEFORE}"),
    );
    let (code, stdout, stderr) = cli_reload(&broker, "admin-secret").await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("applied max_hold"), "{stdout}");
    assert!(
        stdout.contains("kept until a restart: keepalive.interval"),
        "{stdout}"
    );
    match held.next().await {
        Ok(Some(EventKind::Revoked(revoked))) => {
            assert_eq!(revoked.reason(), pb::RevokeReason::MaxHoldExceeded);
        }
        other => panic!("expected Revoked, got {other:?}"),
    }
    held.ends_with(Code::Aborted).await;
}

#[tokio::test]
async fn consumers_sizes_and_capacity_change_live() {
    let broker = start("[auth]\nadmin_token = \"admin-secret\"\n").await;
    let mut first = admin_call(&broker, "x").await;
    first.granted().await;
    let mut second = admin_call(&broker, "y").await;
    second.queued().await;
    rewrite(
        &broker,
        "capacity = 2\n[auth]\nadmin_token = \"admin-secret\"\n\
         [consumers.y]\nkind = \"tts\"\nvram_mib = 3000\n",
    );
    let (code, stdout, stderr) = cli_reload(&broker, "admin-secret").await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("consumers") && stdout.contains("capacity"));
    // The larger capacity grants the waiter at once; the first lease stays.
    second.granted().await;
    let status = broker.status().await;
    assert_eq!(status.in_flight, 2);
    let y = status.consumers.iter().find(|c| c.name == "y").unwrap();
    assert!(y.configured);
    assert_eq!((y.kind(), y.vram_mib), (pb::ConsumerKind::Tts, 3000));
    first.release().await;
    second.release().await;
}

#[tokio::test]
async fn sighup_rereads_a_token_file() {
    let config = "[consumers.a]\ntoken_file = \"a.token\"\n";
    let broker = Broker::start_with(Options {
        config: Some(config),
        files: vec![("a.token", "first-token\n")],
        ..Options::default()
    })
    .await;
    let mut held = Call::open_with_client(client_with(&broker, "first-token").await, acquire("a"))
        .await
        .unwrap();
    held.granted().await;
    std::fs::write(broker.path("a.token"), "second-token\n").unwrap();
    signal(&broker.child, Signal::SIGHUP);
    let status = wait_reloaded(&broker, 1).await;
    assert_eq!(status.in_flight, 1, "the lease held across the reload");
    let old = Call::open_with_client(client_with(&broker, "first-token").await, acquire("a")).await;
    assert_eq!(old.err().unwrap().code(), Code::Unauthenticated);
    let mut new = Call::open_with_client(client_with(&broker, "second-token").await, acquire("a"))
        .await
        .unwrap();
    new.queued().await;
    held.release().await;
    new.granted().await;
}

#[tokio::test]
async fn the_queue_limits_change_live_and_the_server_limits_wait_for_a_restart() {
    let config = "[auth]\nadmin_token = \"admin-secret\"\n";
    let broker = start(config).await;
    let mut holder = admin_call(&broker, "x").await;
    holder.granted().await;
    rewrite(
        &broker,
        &format!("{config}[limits]\nmax_waiters = 1\nmax_message_bytes = 32768\n"),
    );
    let (code, stdout, stderr) = cli_reload(&broker, "admin-secret").await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("applied limits.max_waiters"), "{stdout}");
    assert!(
        stdout.contains("kept until a restart: limits.max_message_bytes"),
        "{stdout}"
    );
    let mut first = admin_call(&broker, "y").await;
    first.queued().await;
    let second = admin_call_result(&broker, "z").await;
    let refused = match second {
        Err(status) => status,
        Ok(mut call) => match call.next().await {
            Err(status) => status,
            other => panic!("expected a refusal, got {other:?}"),
        },
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("max_waiters"), "{refused:?}");
    holder.release().await;
    first.granted().await;
}

#[tokio::test]
async fn a_priority_and_the_scheduling_settings_change_live() {
    let config = "[auth]\nadmin_token = \"admin-secret\"\n[consumers.a]\n[consumers.b]\n";
    let broker = start(config).await;
    let mut holder = admin_call(&broker, "x").await;
    holder.granted().await;
    let mut a = admin_call(&broker, "a").await;
    assert_eq!(a.queued().await.position, 1);
    rewrite(
        &broker,
        "[auth]\nadmin_token = \"admin-secret\"\n[scheduling]\naging = \"0s\"\n\
         [consumers.a]\n[consumers.b]\npriority = 5\n",
    );
    let (code, stdout, stderr) = cli_reload(&broker, "admin-secret").await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("applied consumers, scheduling.aging"),
        "{stdout}"
    );
    // b asks after a, and goes first: its new priority counts.
    let mut b = admin_call(&broker, "b").await;
    assert_eq!(b.queued().await.position, 1);
    holder.release().await;
    b.granted().await;
    b.release().await;
    a.granted().await;
}
