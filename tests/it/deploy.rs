//! The Kubernetes manifests, validated offline against the Kubernetes
//! schemas by `kubernetes-validate` (PyPI; its schemas ship inside the
//! package, so nothing is downloaded at test time beyond the package), and
//! the broker configuration they carry.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::support::BIN;

/// The validator's pinned version.
const VALIDATOR: &str = "kubernetes-validate==1.37.0";

/// The Kubernetes version the manifests are checked against: old enough for
/// most clusters in use, new enough for `runtimeClassName` and friends.
const KUBERNETES: &str = "1.30.0";

fn manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

/// `kubernetes-validate` in a virtualenv under target/, installed from PyPI
/// on first use. Failing to install it fails the test, saying why.
fn validator() -> &'static Path {
    static VALIDATOR_BIN: OnceLock<PathBuf> = OnceLock::new();
    VALIDATOR_BIN.get_or_init(|| {
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("k8s-venv");
        let bin = venv.join("bin/kubernetes-validate");
        if !bin.is_file() {
            let run = |program: &Path, args: &[&str]| {
                let status = Command::new(program)
                    .args(args)
                    .status()
                    .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
                assert!(
                    status.success(),
                    "{} {} failed: the Kubernetes manifests cannot be validated without \
                     {VALIDATOR} from PyPI (python3 with venv and pip is needed)",
                    program.display(),
                    args.join(" ")
                );
            };
            let venv_arg = venv.display().to_string();
            run(Path::new("python3"), &["-m", "venv", &venv_arg]);
            let pip = venv.join("bin/pip");
            run(
                &pip,
                &[
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    VALIDATOR,
                ],
            );
        }
        bin
    })
}

fn validate(files: &[PathBuf]) -> (bool, String) {
    let output = Command::new(validator())
        .args(["--strict", "-k", KUBERNETES])
        .args(files)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), said)
}

#[test]
fn the_manifests_validate_against_the_kubernetes_schemas() {
    let files = vec![
        manifests().join("gpulease.yaml"),
        manifests().join("example-pod.yaml"),
    ];
    let (valid, said) = validate(&files);
    assert!(valid, "{said}");
    for resource in [
        "namespace/gpulease",
        "configmap/gpulease",
        "daemonset/gpulease",
        "pod/train-with-a-lease",
    ] {
        assert!(
            said.contains(&format!("passed for resource {resource}")),
            "{said}"
        );
    }
    let daemonset = std::fs::read_to_string(&files[0]).unwrap();
    for needle in [
        "hostPID: true",
        "runtimeClassName: nvidia",
        "path: /run/gpulease",
        "prometheus.io/scrape: \"true\"",
        "containerPort: 50052",
    ] {
        assert!(daemonset.contains(needle), "the DaemonSet lacks {needle}");
    }

    // The validator does catch a mistake (strict: an unknown field).
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    std::fs::write(&broken, daemonset.replace("hostPID:", "hostPid:")).unwrap();
    let (valid, said) = validate(&[broken]);
    assert!(!valid && said.contains("hostPid"), "{said}");
}

/// The broker configuration in the ConfigMap is one `gpulease serve` takes.
#[test]
fn the_configmap_holds_a_valid_configuration() {
    let manifest = std::fs::read_to_string(manifests().join("gpulease.yaml")).unwrap();
    let (_, rest) = manifest
        .split_once("  gpulease.toml: |\n")
        .expect("the ConfigMap has gpulease.toml");
    let toml: String = rest
        .lines()
        .take_while(|line| line.is_empty() || line.starts_with("    "))
        .map(|line| format!("{}\n", line.strip_prefix("    ").unwrap_or(line)))
        .collect();
    assert!(toml.contains("socket = \"/run/gpulease/gpulease.sock\""));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpulease.toml");
    std::fs::write(&path, &toml).unwrap();
    let output = Command::new(BIN)
        .args(["serve", "--check", "--config"])
        .arg(&path)
        .env_remove("GPULEASE_CONFIG")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}{toml}",
        String::from_utf8_lossy(&output.stderr)
    );
}
