//! `match` rules: a service that never takes a lease (ollama serving Open
//! WebUI) is recognised on the GPU by its executable (and, where this
//! machine lets the test make cgroups, by its container), becomes resident
//! with the memory NVML shows, and is evicted through its unload command
//! when a request needs the memory.

use std::path::{Path, PathBuf};

use gpulease_client::pb::v1 as pb;

use crate::gpu::{FakeGpus, fake_library};
use crate::support::{Broker, Call, Options, acquire};

/// A made-up container id, as Docker writes them.
const CONTAINER: &str = "3f2a9c1b7d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8";

/// A cgroup made for the test in the unified hierarchy, named as Docker's
/// systemd driver names a container's; removed when dropped.
struct ContainerCgroup {
    parent: PathBuf,
    scope: PathBuf,
}

impl ContainerCgroup {
    /// `None` (with the reason on stderr) where this machine does not let
    /// the test make one.
    fn create() -> Option<Self> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let root = mountinfo.lines().find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            right
                .starts_with("cgroup2 ")
                .then(|| PathBuf::from(mount_point))
        });
        let Some(root) = root else {
            eprintln!(
                "no cgroup2 hierarchy is mounted: the container rule is checked on the sample paths of the unit tests only"
            );
            return None;
        };
        let parent = root.join(format!("gpulease-test-{}", std::process::id()));
        let scope = parent.join(format!("docker-{CONTAINER}.scope"));
        match std::fs::create_dir_all(&scope) {
            Ok(()) => Some(Self { parent, scope }),
            Err(e) => {
                eprintln!(
                    "cannot create {} ({e}): the container rule is checked on the sample paths of the unit tests only",
                    scope.display()
                );
                None
            }
        }
    }

    fn enter(&self, pid: u32) {
        std::fs::write(self.scope.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for ContainerCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.scope);
        let _ = std::fs::remove_dir(&self.parent);
    }
}

/// `sleep`, copied under the name `name`, so that its executable is known.
fn copied_sleep(dir: &Path, name: &str) -> PathBuf {
    let sleep = ["/usr/bin/sleep", "/bin/sleep"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .expect("sleep is installed");
    let copy = dir.join(name);
    std::fs::copy(sleep, &copy).unwrap();
    copy
}

fn consumer<'a>(status: &'a pb::StatusResponse, name: &str) -> &'a pb::Consumer {
    status.consumers.iter().find(|c| c.name == name).unwrap()
}

#[tokio::test]
async fn a_matched_service_is_resident_with_its_nvml_footprint_and_evicted_by_its_command() {
    let dir = tempfile::tempdir().unwrap();
    let exe = copied_sleep(dir.path(), "fake-ollama");
    let mut ollama = std::process::Command::new(&exe).arg("600").spawn().unwrap();
    // Another process with the same executable, outside the container.
    let mut lookalike = std::process::Command::new(&exe).arg("600").spawn().unwrap();
    let mut stranger = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let cgroup = ContainerCgroup::create();
    if let Some(cgroup) = &cgroup {
        cgroup.enter(ollama.id());
    }
    let rule = match &cgroup {
        Some(_) => format!(
            "{{ exe = \"fake-ollama\", container = \"{}\" }}",
            &CONTAINER[..12]
        ),
        None => "{ exe = \"fake-ollama\" }".to_owned(),
    };

    let fake = FakeGpus {
        path: dir.path().join("nvml.state"),
    };
    let (gpu, total) = ("GPU-match", 16 * 1024);
    let mut before = vec![(0, ollama.id(), 10 * 1024), (0, stranger.id(), 1024)];
    if cgroup.is_some() {
        before.push((0, lookalike.id(), 512));
    }
    fake.set(&[(gpu, total)], &before);
    // What the unload command leaves: ollama gone from the GPU.
    let after = FakeGpus {
        path: dir.path().join("after.state"),
    };
    let remaining: Vec<_> = before.iter().copied().skip(1).collect();
    after.set(&[(gpu, total)], &remaining);
    let state = fake.path.display().to_string();
    let config = format!(
        r#"
[gpu]
source = "nvml"
safety_margin_mib = 0
poll_interval = "50ms"
unload_timeout = "10s"

[consumers.ollama]
kind = "llm"
match = {rule}
unload = {{ command = ["sh", "-c", "kill {pid} && cp '{after}' \"$FAKE_NVML_STATE.new\" && mv \"$FAKE_NVML_STATE.new\" \"$FAKE_NVML_STATE\""] }}
"#,
        pid = ollama.id(),
        after = after.path.display(),
    );
    let library = fake_library().display().to_string();
    let broker = Broker::start_with(Options {
        env: vec![
            ("GPULEASE__GPU__NVML_LIBRARY", library.as_str()),
            ("FAKE_NVML_STATE", state.as_str()),
            ("GPULEASE__LOCK_DELAY", "0s"),
        ],
        config: Some(&config),
        ..Options::default()
    })
    .await;

    let status = broker
        .wait_for("ollama to be resident by its match rule", |s| {
            s.gpus[0].residents.iter().any(|r| r.consumer == "ollama")
        })
        .await;
    let gpu = &status.gpus[0];
    let resident = gpu
        .residents
        .iter()
        .find(|r| r.consumer == "ollama")
        .unwrap();
    assert_eq!(
        (
            resident.footprint_mib,
            resident.pid,
            resident.attribution.as_str()
        ),
        (10 * 1024, ollama.id(), "matcher")
    );
    let mut unleased: Vec<u32> = gpu.unleased.iter().map(|p| p.pid).collect();
    unleased.sort_unstable();
    let mut expected = vec![stranger.id()];
    if cgroup.is_some() {
        expected.push(lookalike.id());
        expected.sort_unstable();
    }
    assert_eq!(
        unleased, expected,
        "only the unmatched processes are unleased"
    );
    let process = gpu.processes.iter().find(|p| p.pid == ollama.id()).unwrap();
    assert_eq!(
        (process.consumer.as_str(), process.attribution.as_str()),
        ("ollama", "matcher")
    );
    let matcher = &consumer(&status, "ollama").matcher;
    assert!(matcher.starts_with("exe=fake-ollama"), "{matcher}");

    // 8 GiB do not fit beside ollama's 10: it is asked to unload, and its
    // command really frees the memory.
    let mut train = Call::open(
        &broker,
        pb::Acquire {
            vram_mib: 8 * 1024,
            ..acquire("train")
        },
    )
    .await
    .unwrap();
    train.granted().await;
    let killed = ollama.wait().unwrap();
    assert!(
        !killed.success(),
        "the unload command stopped ollama: {killed}"
    );
    let status = broker.status().await;
    let evictions = status.evictions.unwrap();
    assert_eq!(
        (evictions.completed, evictions.last_victim.as_str()),
        (1, "ollama")
    );
    assert!(
        status.gpus[0]
            .residents
            .iter()
            .all(|r| r.consumer != "ollama")
    );
    train.release().await;

    for child in [&mut lookalike, &mut stranger] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    drop(cgroup);
}
