//! Attribution from the kernel: the PID a lease records is the caller's
//! (SO_PEERCRED over the Unix socket, the connection's owner over loopback
//! TCP), whatever `client_pid` it claims; a claim is believed only for the
//! caller's own descendants, and a client in a child PID namespace is
//! recorded by its host PID.

use std::process::Stdio;

use gpulease_client::pb::v1 as pb;
use tokio::process::Command;

use crate::gpu::{FakeGpus, fake_library};
use crate::support::{BIN, Broker, Call, Options, PATIENCE, acquire};

/// A live process that is not a descendant of the test: a `sleep` whose
/// parent shell has exited. Killed when dropped.
pub struct Stranger {
    pub pid: u32,
}

impl Stranger {
    pub fn start() -> Self {
        let output = std::process::Command::new("sh")
            .args(["-c", "sleep 600 </dev/null >/dev/null 2>&1 & echo $!"])
            .output()
            .expect("sh starts a sleep");
        let pid = String::from_utf8(output.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Self { pid }
    }
}

impl Drop for Stranger {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
}

/// The parent and the `NSpid:` line of a process, from `/proc`.
fn parent_and_ns_pids(pid: u32) -> (u32, Vec<u32>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect()
    };
    (field("PPid:")[0], field("NSpid:"))
}

fn the_holder(status: &pb::StatusResponse, consumer: &str) -> pb::Holder {
    status
        .holders
        .iter()
        .find(|h| h.consumer == consumer)
        .unwrap_or_else(|| panic!("{consumer} holds nothing: {status:#?}"))
        .clone()
}

#[tokio::test]
async fn a_claimed_pid_of_another_process_is_ignored_over_tcp_and_the_unix_socket() {
    let broker = Broker::start_with(Options {
        socket: true,
        ..Options::default()
    })
    .await;
    let stranger = Stranger::start();
    let me = std::process::id();
    let claim = |consumer: &str, pid: u32| pb::Acquire {
        client_pid: pid,
        ..acquire(consumer)
    };

    // Loopback TCP: the connection's owner is this test process.
    let mut call = Call::open(&broker, claim("tcp", stranger.pid))
        .await
        .unwrap();
    call.granted().await;
    let holder = the_holder(&broker.status().await, "tcp");
    assert_eq!(
        (holder.client_pid, holder.attribution.as_str()),
        (me, "socket_lookup")
    );
    call.release().await;

    // The Unix socket: SO_PEERCRED says the same.
    let socket = format!("unix:{}", broker.socket.as_ref().unwrap().display());
    let client = gpulease_client::connect(&socket).await.unwrap();
    let mut call = Call::open_with_client(client, claim("unix", stranger.pid))
        .await
        .unwrap();
    call.granted().await;
    let status = broker.status().await;
    let holder = the_holder(&status, "unix");
    assert_eq!(
        (holder.client_pid, holder.attribution.as_str()),
        (me, "peer_credentials")
    );
    assert_eq!(status.gpus[0].holders[0].attribution, "peer_credentials");
    call.release().await;

    // A claim of the caller's own child is believed, and says it was checked.
    let mut child = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let mut call = Call::open(&broker, claim("child", child.id()))
        .await
        .unwrap();
    call.granted().await;
    let holder = the_holder(&broker.status().await, "child");
    assert_eq!(
        (holder.client_pid, holder.attribution.as_str()),
        (child.id(), "checked_hint")
    );
    call.release().await;
    child.kill().unwrap();
    child.wait().unwrap();

    // No claim at all: the kernel's word.
    let mut call = Call::open(&broker, acquire("silent")).await.unwrap();
    call.granted().await;
    let holder = the_holder(&broker.status().await, "silent");
    assert_eq!(
        (holder.client_pid, holder.attribution.as_str()),
        (me, "socket_lookup")
    );
    call.release().await;
}

#[tokio::test]
async fn the_admin_token_may_name_any_process() {
    let broker = Broker::start_with(Options {
        config: Some("[auth]\nadmin_token = \"boss\"\n"),
        ..Options::default()
    })
    .await;
    let stranger = Stranger::start();
    let options = gpulease_client::ConnectOptions {
        token: Some("boss".into()),
        ..Default::default()
    };
    let client = gpulease_client::connect_with(&broker.addr, &options)
        .await
        .unwrap();
    let claim = pb::Acquire {
        client_pid: stranger.pid,
        ..acquire("ops")
    };
    let mut call = Call::open_with_client(client, claim).await.unwrap();
    call.granted().await;
    let holder = the_holder(&broker.status_with(Some("boss")).await, "ops");
    assert_eq!(
        (holder.client_pid, holder.attribution.as_str()),
        (stranger.pid, "unchecked_hint")
    );
}

/// A `gpulease run` in a child PID namespace (as root: `unshare --pid
/// --fork`) claims its namespace's PID 1; the broker records its host PID,
/// over TCP and over the Unix socket.
#[tokio::test]
async fn a_client_in_a_child_pid_namespace_is_recorded_by_its_host_pid() {
    let broker = Broker::start_with(Options {
        socket: true,
        ..Options::default()
    })
    .await;
    let socket = format!("unix:{}", broker.socket.as_ref().unwrap().display());
    for (consumer, address, how) in [
        ("ns-tcp", broker.addr.clone(), "socket_lookup"),
        ("ns-unix", socket, "peer_credentials"),
    ] {
        let mut unshare = Command::new("unshare")
            .args([
                "--pid", "--fork", BIN, "run", "--quiet", "--broker", &address,
            ])
            .args(["--consumer", consumer, "--", "sleep", "600"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("unshare runs (util-linux)");
        let status = broker
            .wait_for(consumer, |s| {
                s.holders.iter().any(|h| h.consumer == consumer)
            })
            .await;
        let holder = the_holder(&status, consumer);
        let (parent, ns_pids) = parent_and_ns_pids(holder.client_pid);
        assert_eq!(
            ns_pids,
            [holder.client_pid, 1],
            "{consumer}: the recorded PID {} is not the namespace's PID 1 seen from the host",
            holder.client_pid
        );
        assert_eq!(
            parent,
            unshare.id().unwrap(),
            "{consumer}: not unshare's child"
        );
        assert_eq!(holder.attribution, how);
        // The namespace's PID 1 ends the namespace, and unshare with it.
        let init = nix::unistd::Pid::from_raw(holder.client_pid as i32);
        nix::sys::signal::kill(init, nix::sys::signal::Signal::SIGKILL).unwrap();
        let _ = tokio::time::timeout(PATIENCE, unshare.wait()).await;
        broker
            .wait_for("the namespaced lease to end", |s| {
                s.holders.iter().all(|h| h.consumer != consumer)
            })
            .await;
    }
}

/// Tried as a hostile local user would: claiming the PID of a process that
/// holds 16 GiB no longer makes that memory count as the caller's, so a
/// second 7 GiB request is not granted into the 8 GiB that are free.
#[tokio::test]
async fn a_spoofed_pid_no_longer_over_commits_the_gpu() {
    let stranger = Stranger::start();
    let state = tempfile::NamedTempFile::new()
        .unwrap()
        .into_temp_path()
        .keep()
        .unwrap();
    let fake = FakeGpus { path: state };
    fake.set(&[("GPU-spoof", 24 * 1024)], &[(0, stranger.pid, 16 * 1024)]);
    let library = fake_library().display().to_string();
    let state = fake.path.display().to_string();
    let broker = Broker::start_with(Options {
        env: vec![
            ("GPULEASE__GPU__NVML_LIBRARY", library.as_str()),
            ("FAKE_NVML_STATE", state.as_str()),
            ("GPULEASE__CAPACITY", "2"),
            ("GPULEASE__LOCK_DELAY", "0s"),
        ],
        config: Some("[gpu]\nsource = \"nvml\"\nsafety_margin_mib = 0\npoll_interval = \"50ms\"\n"),
        ..Options::default()
    })
    .await;

    let spoof = pb::Acquire {
        vram_mib: 7 * 1024,
        client_pid: stranger.pid,
        ..acquire("spoofer")
    };
    let mut first = Call::open(&broker, spoof).await.unwrap();
    first.granted().await;
    let status = broker.status().await;
    let gpu = &status.gpus[0];
    assert_eq!(
        the_holder(&status, "spoofer").client_pid,
        std::process::id()
    );
    // The 16 GiB are still nobody's, and the promise is still unspent.
    assert!(
        gpu.unleased.iter().any(|p| p.pid == stranger.pid),
        "{gpu:#?}"
    );
    assert_eq!(gpu.headroom_mib, 1024);

    let second = pb::Acquire {
        vram_mib: 7 * 1024,
        ..acquire("second")
    };
    let mut second = Call::open(&broker, second).await.unwrap();
    let queued = second.queued().await;
    assert_eq!(queued.position, 1);
    let status = broker
        .wait_for("the second request to wait for memory", |s| {
            s.gpus[0].blocked_by.contains("needs 7168 MiB")
        })
        .await;
    assert_eq!(status.in_flight, 1);
    first.release().await;
    second.granted().await;
}
