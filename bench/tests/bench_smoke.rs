//! Runs `gpulease-bench` once in its tiny configuration against the
//! `gpulease` binary of this build (built first by `cargo build --workspace
//! --bins`), and its sharing benchmark in its quick mode, so that neither
//! can rot. They check only that the runs succeed and write their results:
//! no test asserts a timing.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Far more than the quick run needs, even in a debug build on a loaded
/// machine; the run is killed after it.
const LIMIT: Duration = Duration::from_secs(240);

/// Runs `gpulease-bench ARGS --broker-bin … --out OUT` to its end, within
/// [`LIMIT`], and returns its standard output.
fn run_bench(args: &[&str], out: &Path) -> String {
    let stdout_path = out.join("stdout.txt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpulease-bench"))
        .args(args)
        .arg("--broker-bin")
        .arg(gpulease_testkit::cargo_bin("gpulease"))
        .arg("--out")
        .arg(out)
        // A file, not a pipe: nobody reads a pipe while the run goes on.
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > LIMIT {
            child.kill().unwrap();
            panic!("gpulease-bench {args:?} ran for more than {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&stdout_path).unwrap();
    assert!(
        status.success(),
        "gpulease-bench {args:?} failed: {status}\n{stdout}"
    );
    stdout
}

#[test]
fn quick_benchmark_runs_and_writes_its_results() {
    let out = tempfile::tempdir().unwrap();
    let stdout = run_bench(&["--quick"], out.path());
    assert!(
        stdout.contains("p50 ratio"),
        "no table on stdout:\n{stdout}"
    );

    let json = std::fs::read_to_string(out.path().join("bench.json")).unwrap();
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    for key in [
        "wire",
        "uncontended",
        "handoff",
        "throughput",
        "memory",
        "targets",
    ] {
        let figures = report[key].as_array();
        assert!(
            figures.is_some_and(|figures| !figures.is_empty()),
            "bench.json has no {key}"
        );
    }
    assert!(report["handoff"][0]["handoff"]["p50_us"].is_number());
    let svg = std::fs::read_to_string(out.path().join("handoff-vs-queue.svg")).unwrap();
    assert!(svg.contains("<svg"), "handoff-vs-queue.svg is not an SVG");
    assert!(out.path().join("table.md").is_file());
}

#[test]
fn quick_sharing_benchmark_replays_every_policy_and_writes_its_report() {
    let out = tempfile::tempdir().unwrap();
    let stdout = run_bench(&["sharing", "--quick", "--seed", "3"], out.path());
    assert!(
        stdout.contains("useful GPU-s/h") && stdout.contains("broker p95 s"),
        "no table on stdout:\n{stdout}"
    );

    let json = std::fs::read_to_string(out.path().join("sharing.json")).unwrap();
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["setup"]["seed"], 3);
    let policies = report["policies"].as_array().expect("policies");
    let names: Vec<&str> = policies
        .iter()
        .filter_map(|p| p["policy"].as_str())
        .collect();
    assert_eq!(
        names,
        ["no_broker", "global_lock", "global_lock_unload", "gpulease"]
    );
    for policy in policies {
        let services = policy["services"].as_array().expect("services");
        assert_eq!(services.len(), 4, "{policy}");
        let arrived: u64 = services.iter().filter_map(|s| s["arrived"].as_u64()).sum();
        assert!(arrived > 0, "no job arrived under {}", policy["policy"]);
        for key in [
            "oom",
            "overcommits",
            "margin_breaches",
            "loads",
            "needless_unloads",
        ] {
            assert!(policy["counts"][key].is_u64(), "{key} missing: {policy}");
        }
        assert!(services[0]["end_to_end"]["p95_s"].is_number());
        assert!(services[0]["broker"]["p95_s"].is_number());
        assert!(policy["useful_gpu_s_per_hour"].is_number());
        assert!(policy["busy_fraction"].is_number());
    }
    assert!(!report["targets"].as_array().unwrap().is_empty());
    for policy in ["no-broker", "global-lock", "global-lock-unload", "gpulease"] {
        let log =
            std::fs::read_to_string(out.path().join(format!("sharing-{policy}.log"))).unwrap();
        assert!(
            log.contains("granted"),
            "the {policy} decision log has no grant"
        );
    }
    let svg = std::fs::read_to_string(out.path().join("sharing-waits.svg")).unwrap();
    assert!(svg.contains("<svg"), "sharing-waits.svg is not an SVG");
    assert!(out.path().join("sharing.md").is_file());
}
