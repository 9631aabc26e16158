//! Configuration errors, stale sockets, and graceful shutdown.

use std::os::unix::net::UnixListener;
use std::process::Command;

use gpulease_client::pb::v1 as pb;
use tonic::Code;

use crate::support::{BIN, Broker, Call, Options, acquire};

fn serve_with_config(config: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, config).unwrap();
    let mut command = Command::new(BIN);
    command.args(["serve", "--config"]).arg(&path);
    // The environment would override the file's own `listen`.
    if !config.contains("listen") {
        command.env("GPULEASE__LISTEN", "127.0.0.1:0");
    }
    command.output().unwrap()
}

#[test]
fn a_bad_configuration_exits_64_naming_the_key() {
    for (config, key) in [
        ("capacity = 0", "capacity"),
        ("[keepalive]\ninterval = \"often\"", "interval"),
        ("listen = \"nowhere\"", "listen"),
        ("capacity = 1\ntypo = true", "typo"),
    ] {
        let output = serve_with_config(config);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{config}: {stderr}");
        assert!(
            stderr.contains("invalid configuration") && stderr.contains(key),
            "{stderr}"
        );
        assert!(output.stdout.is_empty(), "nothing may be bound: {output:?}");
    }
}

/// The Unix socket's group and the TLS files are checked when the
/// configuration is loaded: a bad one exits 64 naming its key, before any
/// listener is bound.
#[test]
fn a_bad_socket_group_or_tls_file_exits_64_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    crate::auth::certificates(dir.path());
    let p = |name: &str| dir.path().join(name).display().to_string();
    std::fs::write(p("junk.pem"), "not a certificate\n").unwrap();
    let socket = p("gpulease.sock");
    let tls = |cert: &str, key: &str| {
        format!(
            "[auth]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            p(cert),
            p(key)
        )
    };
    for (config, key, problem) in [
        (
            format!("socket = \"{socket}\"\n[auth]\nsocket_group = \"no-such-group-gpulease\""),
            "`auth.socket_group`",
            "no group",
        ),
        (
            tls("missing.pem", "server.key"),
            "`auth.tls_cert`",
            "cannot read",
        ),
        (
            tls("junk.pem", "server.key"),
            "`auth.tls_cert`",
            "no PEM certificate",
        ),
        (tls("server.pem", "junk.pem"), "`auth.tls_key`", "junk.pem"),
        (
            tls("server.pem", "missing.key"),
            "`auth.tls_key`",
            "cannot read",
        ),
        (
            tls("server.pem", "server.key") + &format!("tls_client_ca = \"{}\"\n", p("junk.pem")),
            "`auth.tls_client_ca`",
            "no PEM certificate",
        ),
    ] {
        let output = serve_with_config(&config);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{config}: {stderr}");
        assert!(
            stderr.contains("invalid configuration")
                && stderr.contains(key)
                && stderr.contains(problem),
            "{config}: {stderr}"
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            !stdout.contains("listening on"),
            "{config}: bound: {stdout}"
        );
        assert!(
            !std::path::Path::new(&socket).exists(),
            "{config}: the socket was bound"
        );
    }
}

#[test]
fn a_missing_configuration_file_exits_64() {
    let output = Command::new(BIN)
        .args(["serve", "--config", "/nonexistent/gpulease.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/gpulease.toml"));
}

#[test]
fn print_defaults_shows_the_embedded_configuration() {
    let output = Command::new(BIN)
        .args(["serve", "--print-defaults"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("listen = \"127.0.0.1:50051\"") && text.contains("capacity = 1"));
}

#[tokio::test]
async fn a_stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("gpulease.sock");
    // A socket file whose listener is gone.
    drop(UnixListener::bind(&socket).unwrap());
    let socket_text = socket.display().to_string();
    let broker = Broker::with_env(&[("GPULEASE__SOCKET", &socket_text)]).await;
    let mut client = gpulease_client::connect(&format!("unix:{socket_text}"))
        .await
        .unwrap();
    client.status(pb::StatusRequest::default()).await.unwrap();

    // A second broker on the same, live socket refuses to start.
    let output = Command::new(BIN)
        .arg("serve")
        .env("GPULEASE__LISTEN", "")
        .env("GPULEASE__SOCKET", &socket_text)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&output.stderr).contains("another broker"));
    drop(broker);
}

#[tokio::test]
async fn shutdown_revokes_holders_ends_waiters_and_exits_zero() {
    let mut broker = Broker::start_with(Options {
        socket: true,
        ..Options::default()
    })
    .await;
    let mut holder = Call::open(&broker, acquire("holder")).await.unwrap();
    holder.granted().await;
    let mut waiter = Call::open(&broker, acquire("waiter")).await.unwrap();
    waiter.queued().await;

    let terminated = {
        let broker = &mut broker;
        async move { broker.terminate().await }
    };
    let (status, (), message) = tokio::join!(
        terminated,
        async {
            match holder.next().await {
                Ok(Some(pb::lease_event::Kind::Revoked(revoked))) => {
                    assert_eq!(revoked.reason(), pb::RevokeReason::Shutdown);
                }
                other => panic!("expected Revoked, got {other:?}"),
            }
            holder.ends_with(Code::Unavailable).await;
        },
        waiter.ends_with(Code::Unavailable),
    );
    assert!(message.contains("shutting down"), "{message}");
    assert!(status.success(), "{status:?}");
    assert!(
        !broker.socket.as_ref().unwrap().exists(),
        "the socket file was left behind"
    );
    let gone = gpulease_client::connect(&broker.addr).await;
    assert!(gone.is_err(), "the broker still answers after shutdown");
}

#[tokio::test]
async fn fencing_tokens_keep_increasing_across_a_kill_9() {
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().display().to_string();
    let env = [("GPULEASE__STATE_DIR", state_dir.as_str())];
    let mut last = 0;
    let mut last_epoch = 0;
    for _ in 0..3 {
        let mut broker = Broker::with_env(&env).await;
        let epoch = broker.status().await.broker.unwrap().epoch;
        assert!(epoch > last_epoch, "epoch {epoch} after {last_epoch}");
        last_epoch = epoch;
        for _ in 0..2 {
            let mut call = Call::open(&broker, acquire("job")).await.unwrap();
            let granted = call.granted().await;
            let token = granted.fencing_token;
            assert!(token > last, "token {token} after {last}");
            assert_eq!(granted.broker_epoch, epoch);
            last = token;
            call.release().await;
        }
        crate::support::signal(&broker.child, nix::sys::signal::Signal::SIGKILL);
        broker.child.wait().await.unwrap();
    }
}

#[test]
fn an_unusable_state_directory_exits_73() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "not a directory").unwrap();
    let output = Command::new(BIN)
        .arg("serve")
        .env("GPULEASE__LISTEN", "127.0.0.1:0")
        .env("GPULEASE__STATE_DIR", blocker.join("state"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(73), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot use the state directory"));
    assert!(output.stdout.is_empty(), "nothing may be bound");
}
