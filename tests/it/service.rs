//! Running under systemd: the shipped unit and sysusers file pass systemd's
//! own checks, the example configuration is valid, and the broker speaks
//! the notify protocol (`READY=1` once its listeners accept, `WATCHDOG=1`,
//! `STATUS=`, `STOPPING=1`) on a `$NOTIFY_SOCKET` of this test's own.

use std::path::{Path, PathBuf};
use tokio::net::UnixDatagram;
use tokio::process::Command;

use crate::support::{BIN, Broker, Options, PATIENCE, http_get};

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/systemd")
        .join(path)
}

#[tokio::test]
async fn systemd_analyze_verifies_the_unit() {
    // The unit exactly as shipped: ExecStart runs `gpulease` from
    // systemd's PATH through /usr/bin/env, which `verify` finds.
    let unit = std::fs::read_to_string(contrib("gpulease.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/env gpulease serve"));
    for needle in [
        "Type=notify",
        "StateDirectory=gpulease",
        "RuntimeDirectory=gpulease",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "User=gpulease",
        "ExecReload=",
        "WatchdogSec=",
        "DeviceAllow=/dev/nvidiactl",
    ] {
        assert!(unit.contains(needle), "the unit lacks {needle}");
    }
    let output = Command::new(crate::metrics::tool("systemd-analyze"))
        .arg("verify")
        .arg(contrib("gpulease.service"))
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    // `verify` exits 0 on unknown keys and bad values, but says so.
    assert!(
        output.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}

#[tokio::test]
async fn the_sysusers_file_and_the_example_config_are_valid() {
    let root = tempfile::tempdir().unwrap();
    let output = Command::new(crate::metrics::tool("systemd-sysusers"))
        .arg(format!("--root={}", root.path().display()))
        .arg("--dry-run")
        .arg(contrib("gpulease.sysusers"))
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "systemd-sysusers: {said}");
    assert!(
        said.contains("Creating user 'gpulease'") && said.contains("group 'gpulease'"),
        "{said}"
    );
    let check = |group: Option<u32>| {
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--check", "--config"])
            .arg(contrib("gpulease.toml"))
            .env_remove("GPULEASE_CONFIG");
        if let Some(gid) = group {
            command.env("GPULEASE__AUTH__SOCKET_GROUP", gid.to_string());
        }
        command.output()
    };
    let mut output = check(None).await.unwrap();
    if !output.status.success() {
        // The socket's group is the one the sysusers file creates at
        // install. Where it does not exist yet, validation says so, and
        // nothing else is wrong: with a group that exists, the file passes.
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{stderr}");
        assert_eq!(
            stderr.trim(),
            "gpulease: invalid configuration: `auth.socket_group`: no group \"gpulease\""
        );
        use std::os::unix::fs::MetadataExt as _;
        let gid = root.path().metadata().unwrap().gid();
        output = check(Some(gid)).await.unwrap();
    }
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(said.contains("/run/gpulease/gpulease.sock"), "{said}");
}

/// The next notification, as `KEY=value` lines.
async fn next_notification(socket: &UnixDatagram) -> String {
    let mut buffer = vec![0; 4096];
    let n = tokio::time::timeout(PATIENCE, socket.recv(&mut buffer))
        .await
        .expect("no notification in time")
        .unwrap();
    String::from_utf8_lossy(&buffer[..n]).into_owned()
}

/// Notifications until one has a line `line`; returns that one.
async fn notification_with(socket: &UnixDatagram, line: &str) -> String {
    loop {
        let message = next_notification(socket).await;
        if message.lines().any(|l| l == line) {
            return message;
        }
    }
}

#[tokio::test]
async fn ready_comes_once_the_listeners_accept_then_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let path = path.display().to_string();
    let mut broker = Broker::start_with(Options {
        env: vec![
            ("NOTIFY_SOCKET", path.as_str()),
            // 200 ms: a ping every 100 ms.
            ("WATCHDOG_USEC", "200000"),
            ("GPULEASE__METRICS__LISTEN", "127.0.0.1:0"),
        ],
        socket: true,
        ..Options::default()
    })
    .await;
    let ready = notification_with(&socket, "READY=1").await;
    assert!(
        ready.lines().any(|l| l == "STATUS=0 held, 0 queued"),
        "{ready:?}"
    );
    // Every listener accepts the moment READY=1 is read.
    tokio::net::TcpStream::connect(&broker.addr).await.unwrap();
    tokio::net::UnixStream::connect(broker.socket.as_ref().unwrap())
        .await
        .unwrap();
    let metrics = broker.metrics.clone().unwrap();
    assert_eq!(http_get(&metrics, "/metrics").await.0, 200);
    assert_eq!(broker.status().await.capacity, 1);

    // Pings follow, well within the watchdog's interval.
    let started = tokio::time::Instant::now();
    notification_with(&socket, "WATCHDOG=1").await;
    notification_with(&socket, "WATCHDOG=1").await;
    assert!(started.elapsed() < PATIENCE);

    crate::support::signal(&broker.child, nix::sys::signal::Signal::SIGTERM);
    let stopping = notification_with(&socket, "STOPPING=1").await;
    assert!(stopping.contains("STATUS=shutting down"), "{stopping:?}");
    let status = tokio::time::timeout(PATIENCE, broker.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    // No READY=1 after STOPPING=1: the broker has exited, so everything it
    // sent is already in the socket's buffer.
    let mut buffer = vec![0; 4096];
    while let Ok(n) = socket.try_recv(&mut buffer) {
        let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
        assert!(!message.contains("READY=1"), "{message:?}");
    }
}
