//! `match` rules: tie GPU processes to a configured consumer by what they
//! are (their executable, systemd unit or container), for services that
//! never take a lease.
//!
//! The broker applies the rules to every process of every GPU memory
//! reading, on the blocking thread that took the reading, and hands the
//! core the processes that matched (pid → consumer). Everything is read
//! from `/proc/PID/exe` (with `/proc/PID/comm` as a fallback) and
//! `/proc/PID/cgroup` of the broker's own PID namespace, which is the one
//! NVML reports PIDs in when the broker runs on the host (or in a container
//! with `--pid=host`).

use crate::config::Consumer;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::core::MemoryReading;

/// One consumer's `match` rule: every key given must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessMatcher {
    /// The executable's file name (`ollama`), or its full path when it
    /// contains a `/`.
    pub exe: Option<String>,
    /// The systemd unit (`ollama.service`; `ollama` means the same).
    pub unit: Option<String>,
    /// A container's id, or a prefix of it (lowercase hex).
    pub container: Option<String>,
}

impl std::fmt::Display for ProcessMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = [
            ("exe", &self.exe),
            ("unit", &self.unit),
            ("container", &self.container),
        ]
        .into_iter()
        .filter_map(|(key, value)| value.as_ref().map(|v| format!("{key}={v}")))
        .collect();
        f.write_str(&parts.join(" "))
    }
}

/// What a rule is checked against, read from `/proc` once per process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessFacts {
    /// The executable (`/proc/PID/exe`), when readable.
    pub exe: Option<PathBuf>,
    /// The command name (`/proc/PID/comm`, at most 15 bytes).
    pub comm: Option<String>,
    /// The cgroup path (the unified hierarchy's, else systemd's).
    pub cgroup: Option<String>,
}

impl ProcessFacts {
    /// Reads the facts of `pid`; what cannot be read stays `None`.
    pub fn read(pid: u32) -> Self {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|path| {
                // The binary was replaced or removed since it started.
                let text = path.to_string_lossy();
                match text.strip_suffix(" (deleted)") {
                    Some(kept) => PathBuf::from(kept),
                    None => path,
                }
            });
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()
            .map(|c| c.trim_end_matches('\n').to_owned());
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|text| cgroup_path(&text).map(str::to_owned));
        Self { exe, comm, cgroup }
    }
}

impl ProcessMatcher {
    /// Whether a process with `facts` matches every key of the rule.
    pub fn matches(&self, facts: &ProcessFacts) -> bool {
        let exe_ok = self
            .exe
            .as_deref()
            .is_none_or(|rule| exe_matches(rule, facts));
        let cgroup = facts.cgroup.as_deref();
        let unit_ok = self.unit.as_deref().is_none_or(|rule| {
            cgroup
                .and_then(unit_of)
                .is_some_and(|unit| unit == rule || unit.strip_suffix(".service") == Some(rule))
        });
        let container_ok = self.container.as_deref().is_none_or(|rule| {
            cgroup
                .and_then(container_of)
                .is_some_and(|id| id.starts_with(rule))
        });
        exe_ok && unit_ok && container_ok
    }
}

fn exe_matches(rule: &str, facts: &ProcessFacts) -> bool {
    match &facts.exe {
        Some(exe) if rule.contains('/') => exe == Path::new(rule),
        Some(exe) => exe.file_name().is_some_and(|name| name == rule),
        // The kernel keeps 15 bytes of the name.
        None if !rule.contains('/') => facts
            .comm
            .as_deref()
            .is_some_and(|comm| comm == rule || (comm.len() == 15 && rule.starts_with(comm))),
        None => false,
    }
}

/// The path of the unified (v2) hierarchy in a `/proc/PID/cgroup`, or else
/// systemd's named v1 hierarchy, or else the first one.
pub(crate) fn cgroup_path(text: &str) -> Option<&str> {
    let lines: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            Some((controllers, path))
        })
        .collect();
    let pick = |wanted: &str| lines.iter().find(|(c, _)| *c == wanted).map(|(_, p)| *p);
    pick("")
        .filter(|path| *path != "/")
        .or_else(|| pick("name=systemd"))
        .or_else(|| pick(""))
        .or_else(|| lines.first().map(|(_, p)| *p))
}

/// The systemd unit of a cgroup path: its deepest `.service` or `.scope`
/// component (`/system.slice/ollama.service` → `ollama.service`).
pub(crate) fn unit_of(path: &str) -> Option<&str> {
    path.rsplit('/')
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
}

/// The container id (64 hex digits) in a cgroup path, in the forms Docker,
/// Podman, containerd and CRI-O use:
/// - `/system.slice/docker-ID.scope` (Docker, systemd cgroup driver)
/// - `/docker/ID` (Docker, cgroupfs driver)
/// - `/machine.slice/libpod-ID.scope` and, rootless,
///   `/user.slice/…/user@UID.service/user.slice/libpod-ID.scope/container`
///   (Podman, systemd driver); `/libpod_parent/libpod-ID` (cgroupfs)
/// - `…/cri-containerd-ID.scope`, `…/crio-ID.scope`, `/kubepods/…/ID`
///
/// Podman's `libpod-conmon-ID.scope` is its monitor, not the container.
pub(crate) fn container_of(path: &str) -> Option<&str> {
    const PREFIXES: [&str; 4] = ["docker-", "libpod-", "cri-containerd-", "crio-"];
    path.rsplit('/').find_map(|component| {
        let bare = component.strip_suffix(".scope").unwrap_or(component);
        let id = PREFIXES
            .iter()
            .find_map(|prefix| bare.strip_prefix(prefix))
            .unwrap_or(bare);
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
    })
}

/// Every consumer's rule, applied in the order of the consumers' names.
#[derive(Debug, Default)]
pub(crate) struct Matchers {
    rules: Vec<(String, ProcessMatcher)>,
}

impl Matchers {
    /// The rules of the configuration, by consumer.
    pub(crate) fn new(consumers: &BTreeMap<String, Consumer>) -> Self {
        Self {
            rules: consumers
                .iter()
                .filter_map(|(name, c)| Some((name.clone(), c.matcher.clone()?)))
                .collect(),
        }
    }

    /// The rules, by consumer.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&String, &ProcessMatcher)> {
        self.rules.iter().map(|(name, rule)| (name, rule))
    }

    /// Whether there is no rule at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first consumer (by name) whose rule matches a process with
    /// `facts`.
    pub(crate) fn consumer_for(&self, facts: &ProcessFacts) -> Option<&str> {
        self.rules
            .iter()
            .find(|(_, rule)| rule.matches(facts))
            .map(|(name, _)| name.as_str())
    }

    /// The processes of `reading` that a rule ties to a consumer. Reads
    /// `/proc` (blocking), once per process.
    pub(crate) fn tag(&self, reading: &MemoryReading) -> BTreeMap<u32, String> {
        if self.is_empty() {
            return BTreeMap::new();
        }
        let mut facts: HashMap<u32, ProcessFacts> = HashMap::new();
        reading
            .processes
            .iter()
            .filter_map(|process| {
                let facts = facts
                    .entry(process.pid)
                    .or_insert_with(|| ProcessFacts::read(process.pid));
                self.consumer_for(facts)
                    .map(|consumer| (process.pid, consumer.to_owned()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a9c1b7d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8";

    #[test]
    fn container_ids_in_docker_and_podman_cgroup_paths() {
        for path in [
            format!("/system.slice/docker-{ID}.scope"),
            format!("/docker/{ID}"),
            format!("/machine.slice/libpod-{ID}.scope"),
            format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
            ),
            format!("/libpod_parent/libpod-{ID}"),
            format!("/kubepods.slice/kubepods-besteffort.slice/cri-containerd-{ID}.scope"),
            format!("/kubepods/besteffort/pod1234/{ID}"),
        ] {
            assert_eq!(container_of(&path), Some(ID), "{path}");
        }
        assert_eq!(
            container_of(&format!("/machine.slice/libpod-conmon-{ID}.scope")),
            None
        );
        assert_eq!(container_of("/system.slice/ollama.service"), None);
        assert_eq!(container_of("/"), None);
    }

    #[test]
    fn units_and_hierarchies() {
        let v2 = "0::/system.slice/ollama.service\n";
        assert_eq!(cgroup_path(v2), Some("/system.slice/ollama.service"));
        let v1 = "12:pids:/\n1:name=systemd:/system.slice/comfyui.service\n0::/\n";
        assert_eq!(cgroup_path(v1), Some("/system.slice/comfyui.service"));
        assert_eq!(
            unit_of("/system.slice/ollama.service"),
            Some("ollama.service")
        );
        let user = "/user.slice/user-1000.slice/user@1000.service/app.slice/tts.service";
        assert_eq!(unit_of(user), Some("tts.service"));
        let docker = format!("/system.slice/docker-{ID}.scope");
        assert_eq!(unit_of(&docker), Some(&docker["/system.slice/".len()..]));
        assert_eq!(unit_of("/"), None);
    }

    #[test]
    fn every_key_given_must_match() {
        let facts = ProcessFacts {
            exe: Some(PathBuf::from("/usr/local/bin/ollama")),
            comm: Some("ollama".into()),
            cgroup: Some(format!("/system.slice/docker-{ID}.scope")),
        };
        let rule =
            |exe: Option<&str>, unit: Option<&str>, container: Option<&str>| ProcessMatcher {
                exe: exe.map(str::to_owned),
                unit: unit.map(str::to_owned),
                container: container.map(str::to_owned),
            };
        assert!(rule(Some("ollama"), None, None).matches(&facts));
        assert!(rule(Some("/usr/local/bin/ollama"), None, None).matches(&facts));
        assert!(!rule(Some("/usr/bin/ollama"), None, None).matches(&facts));
        assert!(!rule(Some("llama"), None, None).matches(&facts));
        assert!(rule(Some("ollama"), None, Some(&ID[..12])).matches(&facts));
        assert!(!rule(Some("ollama"), None, Some("0123")).matches(&facts));
        assert!(!rule(Some("ollama"), Some("ollama"), None).matches(&facts));
        let service = ProcessFacts {
            cgroup: Some("/system.slice/ollama.service".into()),
            ..facts.clone()
        };
        assert!(rule(None, Some("ollama"), None).matches(&service));
        assert!(rule(None, Some("ollama.service"), None).matches(&service));
        // Without a readable executable, the command name (15 bytes) stands in.
        let hidden = ProcessFacts {
            exe: None,
            comm: Some("ollama_llama_se".into()),
            cgroup: None,
        };
        assert!(rule(Some("ollama_llama_server"), None, None).matches(&hidden));
        assert!(!rule(Some("/opt/ollama_llama_server"), None, None).matches(&hidden));
    }

    #[test]
    fn reads_this_process() {
        let facts = ProcessFacts::read(std::process::id());
        let exe = std::env::current_exe().unwrap();
        assert_eq!(facts.exe.as_deref(), Some(exe.as_path()));
        assert!(facts.comm.is_some() && facts.cgroup.is_some());
    }
}
