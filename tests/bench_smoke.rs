//! Runs `gpulease-bench` once in its tiny configuration against the
//! `gpulease` binary of this build, so that the benchmark cannot rot. It
//! checks only that the run succeeds and writes its results: no test
//! asserts a timing.

use std::process::Command;
use std::time::{Duration, Instant};

/// Far more than the quick run needs, even in a debug build on a loaded
/// machine; the run is killed after it.
const LIMIT: Duration = Duration::from_secs(240);

#[test]
fn quick_benchmark_runs_and_writes_its_results() {
    let out = tempfile::tempdir().unwrap();
    let stdout_path = out.path().join("stdout.txt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpulease-bench"))
        .arg("--quick")
        .arg("--broker-bin")
        .arg(env!("CARGO_BIN_EXE_gpulease"))
        .arg("--out")
        .arg(out.path())
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
            panic!("gpulease-bench --quick ran for more than {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&stdout_path).unwrap();
    assert!(
        status.success(),
        "gpulease-bench --quick failed: {status}\n{stdout}"
    );
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
