//! The Prometheus endpoint: a scrape that `promtool check metrics` accepts,
//! a real Prometheus server that scrapes the broker, and the shipped alert
//! rules and dashboard.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::gpu::{FakeGpus, GIB, broker_with_state, use_once};
use crate::support::{Broker, Call, Options, PATIENCE, Worker, acquire, http_get};

/// A tool that the README's test command installs (Debian's `prometheus`
/// package); its absence is a failure that says how to get it, never a skip.
pub(crate) fn tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{name} is not installed: run scripts/test, which installs it \
             (apt-get install prometheus), or install it yourself"
        )
    })
}

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(path)
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
        rest.trim().parse().ok()
    })
}

/// Runs `promtool check metrics` on `exposition`; returns what it said.
async fn promtool_check(exposition: &str) -> (bool, String) {
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(exposition.as_bytes()).await.unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    let said = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success() && said.trim().is_empty(), said)
}

const TWO_GPUS: [(&str, u64); 2] = [("GPU-fake-0", 24 * GIB), ("GPU-fake-1", 16 * GIB)];

/// A broker on two fake GPUs with a resident (`tts` on GPU 0), holders
/// (`llm` on GPU 0, a stranger on GPU 1), a waiter (`image` on GPU 0) and an
/// unleased process on GPU 1. Returns the calls and the resident's process
/// to keep.
async fn busy_broker() -> (Broker, FakeGpus, Vec<Call>, [Worker; 2]) {
    let (broker, fake) = broker_with_state(
        &TWO_GPUS,
        &[],
        &[
            ("GPULEASE__METRICS__LISTEN", "127.0.0.1:0"),
            ("GPULEASE__LOCK_DELAY", "0s"),
        ],
    )
    .await;
    // The resident's process: the test's child, so that its lease may
    // claim it.
    let tts = Worker::start();
    fake.set(&TWO_GPUS, &[(0, tts.pid(), 3 * GIB)]);
    use_once(&broker, "tts", tts.pid()).await;
    let mut llm = acquire("llm");
    llm.gpu = "0".into();
    // Its own process, or the test's children (tts's) would count as its.
    let llm_process = Worker::start();
    llm.client_pid = llm_process.pid();
    llm.vram_mib = 8 * GIB;
    let mut llm = Call::open(&broker, llm).await.unwrap();
    llm.granted().await;
    let mut image = acquire("image");
    image.gpu = "0".into();
    let mut image = Call::open(&broker, image).await.unwrap();
    image.queued().await;
    let mut stranger = acquire("job-42");
    stranger.gpu = "1".into();
    let mut stranger = Call::open(&broker, stranger).await.unwrap();
    stranger.granted().await;
    fake.set(&TWO_GPUS, &[(0, tts.pid(), 3 * GIB), (1, 4999, GIB)]);
    broker
        .wait_for("the unleased process on GPU 1", |s| {
            s.gpus.len() == 2 && s.gpus[1].unleased.len() == 1 && s.gpus[0].residents.len() == 1
        })
        .await;
    (broker, fake, vec![llm, image, stranger], [tts, llm_process])
}

/// Scrapes until `ready` holds. Counters are updated just after the
/// decision's lock is released, so a client can hear of its grant a moment
/// before the grant is counted; there is no event to await for that.
async fn scrape_until(broker: &Broker, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let exposition = broker.scrape().await;
        if ready(&exposition) {
            return exposition;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the metrics never showed {what}:\n{exposition}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn promtool_accepts_a_scrape_of_a_busy_broker_on_two_gpus() {
    let (broker, _fake, _calls, _tts) = busy_broker().await;
    let exposition = scrape_until(&broker, "the stranger's grant", |e| {
        sample(
            e,
            r#"gpulease_grants_total{consumer="(unconfigured)",gpu="1"}"#,
        ) == Some(1.0)
    })
    .await;
    let (clean, said) = promtool_check(&exposition).await;
    assert!(clean, "promtool check metrics: {said}\n{exposition}");

    let value = |series: &str| {
        sample(&exposition, series).unwrap_or_else(|| panic!("no {series} in\n{exposition}"))
    };
    let mib = 1024.0 * 1024.0;
    assert_eq!(value(r#"gpulease_queue_depth{gpu="0"}"#), 1.0);
    assert_eq!(value(r#"gpulease_queue_depth{gpu="1"}"#), 0.0);
    assert_eq!(value(r#"gpulease_leases_held{gpu="0"}"#), 1.0);
    assert_eq!(value(r#"gpulease_leases_held{gpu="1"}"#), 1.0);
    assert_eq!(value(r#"gpulease_capacity{gpu="1"}"#), 1.0);
    assert!(value(r#"gpulease_oldest_waiter_age_seconds{gpu="0"}"#) > 0.0);
    assert_eq!(value(r#"gpulease_oldest_waiter_age_seconds{gpu="1"}"#), 0.0);
    assert_eq!(
        value(r#"gpulease_gpu_memory_total_bytes{gpu="1"}"#),
        16.0 * 1024.0 * mib
    );
    assert_eq!(
        value(r#"gpulease_gpu_memory_free_bytes{gpu="0"}"#),
        21.0 * 1024.0 * mib
    );
    // llm asked for 8 GiB and its process has allocated nothing yet.
    assert_eq!(
        value(r#"gpulease_gpu_memory_promised_bytes{gpu="0"}"#),
        8.0 * 1024.0 * mib
    );
    assert_eq!(
        value(r#"gpulease_resident_memory_bytes{consumer="tts",gpu="0"}"#),
        3.0 * 1024.0 * mib
    );
    assert_eq!(value(r#"gpulease_unleased_processes{gpu="1"}"#), 1.0);
    assert_eq!(value(r#"gpulease_unleased_processes{gpu="0"}"#), 0.0);
    assert_eq!(
        value(r#"gpulease_gpu_info{gpu="1",name="Fake GPU 1",uuid="GPU-fake-1"}"#),
        1.0
    );
    assert_eq!(
        value(r#"gpulease_grants_total{consumer="tts",gpu="0"}"#),
        1.0
    );
    assert_eq!(
        value(r#"gpulease_grants_total{consumer="image",gpu="0"}"#),
        0.0
    );
    // A consumer that is not configured is folded into one value.
    assert_eq!(
        value(r#"gpulease_grants_total{consumer="(unconfigured)",gpu="1"}"#),
        1.0
    );
    assert!(
        !exposition.contains("job-42"),
        "a stranger's name is a label"
    );
    assert_eq!(
        value(r#"gpulease_lease_ends_total{consumer="tts",gpu="0",reason="released"}"#),
        1.0
    );
    assert_eq!(
        value(r#"gpulease_lease_wait_seconds_count{consumer="llm",gpu="0"}"#),
        1.0
    );
    assert_eq!(
        value(r#"gpulease_lease_hold_seconds_count{consumer="tts",gpu="0"}"#),
        1.0
    );
    assert_eq!(value("gpulease_log_lines_dropped_total"), 0.0);
    let version = format!(
        r#"gpulease_build_info{{version="{}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&version), 1.0);
    for name in [
        "gpulease_acquire_rejections_total",
        "gpulease_unload_requests_total",
        "gpulease_unload_duration_seconds",
    ] {
        assert!(
            exposition.contains(&format!("# TYPE {name} ")),
            "{name} is not declared"
        );
    }
    // No lease id, token or pid as a label.
    for needle in ["lease_id", "token", "pid"] {
        assert!(
            !exposition
                .lines()
                .filter(|l| !l.starts_with('#'))
                .any(|l| l.contains(&format!("{needle}="))),
            "{needle} is a label"
        );
    }
}

#[tokio::test]
async fn refusals_evictions_and_other_paths() {
    let (broker, fake) = broker_with_state(
        &[("GPU-fake-0", 16 * GIB)],
        &[],
        &[
            ("GPULEASE__METRICS__LISTEN", "127.0.0.1:0"),
            ("GPULEASE__LOCK_DELAY", "0s"),
        ],
    )
    .await;
    // A bad name and an impossible size are refused before the queue.
    let bad = Call::open(&broker, acquire("a b")).await;
    assert_eq!(bad.err().unwrap().code(), tonic::Code::InvalidArgument);
    let mut huge = acquire("image");
    huge.vram_mib = 64 * GIB;
    let huge = Call::open(&broker, huge).await;
    assert_eq!(huge.err().unwrap().code(), tonic::Code::ResourceExhausted);
    // llm stays resident with 10 GiB, then image needs 12 GiB: llm is asked
    // to unload (its command succeeds) and its process leaves the GPU.
    let card = [("GPU-fake-0", 16 * GIB)];
    let llm = Worker::start();
    fake.set(&card, &[(0, llm.pid(), 10 * GIB)]);
    use_once(&broker, "llm", llm.pid()).await;
    broker
        .wait_for("llm resident", |s| s.gpus[0].free_mib == 6 * GIB)
        .await;
    let mut image = acquire("image");
    image.vram_mib = 12 * GIB;
    let mut image = Call::open(&broker, image).await.unwrap();
    broker
        .wait_for("llm asked to unload", |s| {
            s.evictions.as_ref().is_some_and(|e| e.requested == 1)
        })
        .await;
    fake.set(&card, &[]);
    image.granted().await;
    // The poller settles the unload on the reading that shows it done.
    let exposition = scrape_until(&broker, "the unload", |e| {
        e.contains(r#"result="unloaded""#)
    })
    .await;
    let value = |series: &str| {
        sample(&exposition, series).unwrap_or_else(|| panic!("no {series} in\n{exposition}"))
    };
    assert_eq!(
        value(r#"gpulease_acquire_rejections_total{code="INVALID_ARGUMENT"}"#),
        1.0
    );
    assert_eq!(
        value(r#"gpulease_acquire_rejections_total{code="RESOURCE_EXHAUSTED"}"#),
        1.0
    );
    assert_eq!(
        value(r#"gpulease_unload_requests_total{consumer="llm",gpu="0",result="unloaded"}"#),
        1.0
    );
    assert_eq!(
        value(r#"gpulease_unload_duration_seconds_count{consumer="llm"}"#),
        1.0
    );
    let (clean, said) = promtool_check(&exposition).await;
    assert!(clean, "promtool check metrics: {said}\n{exposition}");
    // Anything but /metrics is not found; the listener keeps serving.
    let addr = broker.metrics.clone().unwrap();
    assert_eq!(http_get(&addr, "/nope").await.0, 404);
    assert_eq!(http_get(&addr, "/metrics").await.0, 200);
}

/// A free loopback port for a server that cannot report the port it bound.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn a_real_prometheus_scrapes_queue_depth_and_grants() {
    let config = r#"
[consumers.a]
[consumers.b]
[consumers.c]
"#;
    let broker = Broker::start_with(Options {
        env: vec![("GPULEASE__METRICS__LISTEN", "127.0.0.1:0")],
        config: Some(config),
        ..Options::default()
    })
    .await;
    let mut a = Call::open(&broker, acquire("a")).await.unwrap();
    a.granted().await;
    let mut b = Call::open(&broker, acquire("b")).await.unwrap();
    b.queued().await;
    let mut c = Call::open(&broker, acquire("c")).await.unwrap();
    c.queued().await;

    let dir = tempfile::tempdir().unwrap();
    let target = broker.metrics.clone().unwrap();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: gpulease\n    \
             static_configs:\n      - targets: [\"{target}\"]\n"
        ),
    )
    .unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let mut prometheus = Command::new(tool("prometheus"))
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // Prometheus scrapes on its own schedule: ask until the answer is there.
    let query = |promql: &'static str| {
        let web = web.clone();
        async move {
            let path = format!("/api/v1/query?query={}", encode(promql));
            let deadline = tokio::time::Instant::now() + PATIENCE * 3;
            loop {
                if tokio::net::TcpStream::connect(&web).await.is_ok() {
                    let (status, _, body) = http_get(&web, &path).await;
                    if status == 200 {
                        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
                        if let Some(value) = answer["data"]["result"][0]["value"][1].as_str() {
                            return value.to_owned();
                        }
                    }
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "Prometheus never answered {promql}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(query(r#"up{job="gpulease"}"#).await, "1");
    assert_eq!(query(r#"gpulease_queue_depth{gpu="0"}"#).await, "2");
    assert_eq!(query("sum(gpulease_grants_total)").await, "1");
    assert_eq!(query(r#"gpulease_grants_total{consumer="a"}"#).await, "1");
    prometheus.kill().await.unwrap();
    drop((a, b, c));
}

/// Percent-encodes a PromQL query for a URL.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn the_shipped_alert_rules_pass_their_unit_tests() {
    let dir = contrib("prometheus");
    for args in [
        ["check", "rules", "gpulease.rules.yml"],
        ["test", "rules", "gpulease.rules.test.yml"],
        ["check", "config", "prometheus.yml"],
    ] {
        let output = Command::new(tool("promtool"))
            .args(args)
            .current_dir(&dir)
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Every metric the rules and the dashboard use is one the broker exposes.
#[tokio::test]
async fn the_rules_and_the_dashboard_use_only_metrics_that_exist() {
    // On (fake) NVML, so that the memory readings are there too.
    let (broker, _fake) = broker_with_state(
        &TWO_GPUS,
        &[],
        &[("GPULEASE__METRICS__LISTEN", "127.0.0.1:0")],
    )
    .await;
    // Every family appears once it has a series: configured consumers start
    // theirs at zero; how leases end appears with the first end.
    use_once(&broker, "llm", 0).await;
    let exposition = scrape_until(&broker, "a lease end", |e| {
        e.contains("# TYPE gpulease_lease_ends_total")
    })
    .await;
    let declared: Vec<&str> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let dashboard = std::fs::read_to_string(contrib("prometheus/grafana-dashboard.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    assert!(parsed["panels"].as_array().unwrap().len() >= 8);
    let rules = std::fs::read_to_string(contrib("prometheus/gpulease.rules.yml")).unwrap();
    let mut used = 0;
    for text in [&dashboard, &rules] {
        for (start, _) in text.match_indices("gpulease_") {
            let name: String = text[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name);
            assert!(
                declared.contains(&base) || declared.contains(&name.as_str()),
                "{name} is not exposed by the broker"
            );
            used += 1;
        }
    }
    assert!(used > 15, "only {used} metric references found");
}

/// Idle connections cannot take the metrics listener over: past 64 at once,
/// new ones are closed; once they go, scrapes work again.
#[tokio::test]
async fn the_metrics_listener_bounds_its_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let broker = Broker::with_env(&[("GPULEASE__METRICS__LISTEN", "127.0.0.1:0")]).await;
    let addr = broker.metrics.clone().unwrap();
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    // The 65th is accepted and closed at once, without an answer.
    let refused = async {
        loop {
            let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let _ = extra
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
            let mut answer = Vec::new();
            let _ = extra.read_to_end(&mut answer).await;
            if answer.is_empty() {
                return;
            }
            // Accepted before the last idle connection was: try again.
        }
    };
    tokio::time::timeout(PATIENCE, refused)
        .await
        .expect("a 65th connection was served");
    drop(idle);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let _ = stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        if answer.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener did not recover"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
