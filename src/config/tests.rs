//! Tests of loading and validating the configuration.

use super::*;
use crate::core::ConsumerKind;

fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpulease.toml");
    std::fs::write(&path, toml).unwrap();
    let env = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Config::load(Some(&path), Some(env))
}

fn error(toml: &str, env: &[(&str, &str)]) -> String {
    load(toml, env).unwrap_err().to_string()
}

#[test]
fn defaults() {
    let config = Config::defaults();
    assert_eq!(config.listen, Some("127.0.0.1:50051".parse().unwrap()));
    assert_eq!(config.socket, None);
    assert_eq!(config.capacity, 1);
    assert!(!config.strict_consumers);
    assert_eq!(config.max_hold, None);
    assert_eq!(config.dead_client_bound(), Duration::from_secs(10));
    assert!(config.consumers.is_empty());
    assert_eq!(config.metrics.listen, None);
    assert_eq!(
        config.scheduling,
        SchedulingConfig {
            backfill: true,
            aging: Duration::from_secs(60),
            preempt_after: Duration::from_secs(30),
        }
    );
}

#[test]
fn priorities_and_preemption() {
    let config = load(
        r#"
        [scheduling]
        backfill = false
        aging = "0s"
        preempt_after = "2m"
        [consumers.mvoice]
        priority = 10
        [consumers.train]
        priority = -5
        preemptible = true
        preempt_grace = "1m"
        [consumers.batch]
        preemptible = true
        "#,
        &[],
    )
    .unwrap();
    assert!(!config.scheduling.backfill);
    assert_eq!(config.scheduling.aging, Duration::ZERO);
    assert_eq!(config.scheduling.preempt_after, Duration::from_secs(120));
    let by_name = |name: &str| &config.consumers[name].profile;
    assert_eq!(by_name("mvoice").priority, 10);
    assert!(!by_name("mvoice").preemptible);
    assert_eq!(by_name("train").priority, -5);
    assert_eq!(by_name("train").preempt_grace, Duration::from_secs(60));
    assert_eq!(by_name("batch").preempt_grace, Duration::from_secs(30));
    assert!(error("[consumers.x]\npriority = 5000", &[]).contains("`consumers.x.priority`"));
    assert!(error("[consumers.x]\npriority = \"high\"", &[]).contains("priority"));
    assert!(
        error("[consumers.x]\npreempt_grace = \"5s\"", &[]).contains("`consumers.x.preempt_grace`")
    );
    assert!(error("[scheduling]\naging = \"often\"", &[]).contains("aging"));
    assert!(error("[scheduling]\nbackfil = true", &[]).contains("backfil"));
}

#[test]
fn file_then_environment() {
    let config = load(
        r#"
        capacity = 3
        max_hold = "10m"
        socket = "/tmp/gpulease.sock"
        [keepalive]
        interval = "2s"
        [consumers.mvoice]
        kind = "tts"
        vram_mib = 3000
        coexist = true
        [consumers.ollama]
        kind = "llm"
        idle_ttl = "5m"
        unload = { command = ["curl", "-d", "{}", "http://127.0.0.1:11434/api/generate"] }
        [gpu]
        static_memory_mib = [16384, 8192]
        "#,
        &[
            ("GPULEASE__CAPACITY", "2"),
            ("GPULEASE__KEEPALIVE__TIMEOUT", "1s"),
        ],
    )
    .unwrap();
    assert_eq!(config.capacity, 2);
    assert_eq!(config.max_hold, Some(Duration::from_secs(600)));
    assert_eq!(config.socket, Some(PathBuf::from("/tmp/gpulease.sock")));
    assert_eq!(config.keepalive_interval, Duration::from_secs(2));
    assert_eq!(config.keepalive_timeout, Duration::from_secs(1));
    assert_eq!(config.gpu.static_memory_mib, [16384, 8192]);
    for (value, sizes) in [("8192", vec![8192]), ("8192,4096", vec![8192, 4096])] {
        let env = [("GPULEASE__GPU__STATIC_MEMORY_MIB", value)];
        assert_eq!(load("", &env).unwrap().gpu.static_memory_mib, sizes);
    }
    assert!(error("", &[("GPULEASE__GPU__STATIC_MEMORY_MIB", "8G")]).contains("8G"));
    assert_eq!(config.gpu.source, InventorySource::Auto);
    assert_eq!(
        config.consumers["ollama"].unload.clone().unwrap(),
        UnloadMethod::Command(vec![
            "curl".into(),
            "-d".into(),
            "{}".into(),
            "http://127.0.0.1:11434/api/generate".into()
        ])
    );
    assert_eq!(
        config.profiles().collect::<Vec<_>>(),
        [
            ConsumerProfile {
                vram_mib: 3000,
                coexist: true,
                ..ConsumerProfile::new("mvoice", ConsumerKind::Tts)
            },
            ConsumerProfile {
                unloadable: true,
                idle_ttl: Some(Duration::from_secs(300)),
                ..ConsumerProfile::new("ollama", ConsumerKind::Llm)
            },
        ]
    );
}

/// Every TOML example in the README is a valid configuration.
#[test]
fn the_readme_examples_load() {
    let readme = include_str!("../../README.md");
    let mut examples = 0;
    for block in readme.split("```toml\n").skip(1) {
        let example = block.split("```").next().unwrap();
        match load(example, &[]) {
            Ok(_) => {}
            // The examples name files that exist on the reader's machine.
            Err(e) if e.to_string().contains("cannot read /etc/gpulease/") => {}
            Err(e) => panic!("{e}\n{example}"),
        }
        examples += 1;
    }
    assert!(examples >= 5, "only {examples} examples found");
}

#[test]
fn errors_name_the_key() {
    assert!(error("capacity = 0", &[]).contains("`capacity`: must be between 1 and 1024"));
    assert!(error("capacity = \"x\"", &[]).contains("capacity"));
    assert!(error("capcity = 2", &[]).contains("capcity"));
    assert!(error("listen = \"localhost\"", &[]).contains("`listen`"));
    assert!(error("[keepalive]\ninterval = \"soon\"", &[]).contains("interval"));
    assert!(error("[keepalive]\ntimeout = \"1ms\"", &[]).contains("`keepalive.timeout`"));
    assert!(error("[consumers.\"a b\"]\nkind = \"tts\"", &[]).contains("`consumers.a b`"));
    assert!(error("[consumers.x]\nkind = \"gpu\"", &[]).contains("gpu"));
    assert!(error("listen = \"\"", &[]).contains("at least one place to listen"));
    assert!(error("", &[("GPULEASE__CAPACITY", "lots")]).contains("capacity"));
    assert!(error("[gpu]\nsource = \"cuda\"", &[]).contains("cuda"));
    assert!(error("[consumers.x]\nunload = \"please\"", &[]).contains("`consumers.x.unload`"));
    assert!(error("[consumers.x]\nunload = { command = [] }", &[]).contains("is empty"));
    assert!(error("[auth]\nsocket_mode = \"rw\"", &[]).contains("`auth.socket_mode`"));
    assert!(error("[metrics]\nlisten = \":9\"", &[]).contains("`metrics.listen`"));
    assert!(error("[metrics]\nport = 9", &[]).contains("port"));
    assert!(error("[auth]\ntls_cert = \"a.pem\"", &[]).contains("tls_key"));
    let both = "[consumers.x]\ntoken = \"t\"\ntoken_file = \"/f\"";
    assert!(error(both, &[]).contains("not both"));
    let shared = "[auth]\nadmin_token = \"t\"\n[consumers.x]\ntoken = \"t\"";
    assert!(error(shared, &[]).contains("share a token"));
    let config = load("[auth]\nadmin_token = \"hunter2\"", &[]).unwrap();
    assert!(
        !format!("{config:?}").contains("hunter2"),
        "a token was printed"
    );
    assert!(error("[consumers.x]\nmatch = {}", &[]).contains("`consumers.x.match`"));
    assert!(error("[gate]\nupstream = \"ftp://x\"", &[]).contains("`gate.upstream`"));
    assert!(error("[gate]\nupstream = \"http://h:1/api\"", &[]).contains("has a path"));
    assert!(error("[gate]\nlisten = \"here\"", &[]).contains("`gate.listen`"));
    assert!(error("[gate]\nport = 1", &[]).contains("port"));
    assert!(error("[consumers.x]\nmatch = { exe = \"\" }", &[]).contains("match.exe"));
    let not_hex = "[consumers.x]\nmatch = { container = \"web\" }";
    assert!(error(not_hex, &[]).contains("`consumers.x.match.container`"));
    assert!(error("[consumers.x]\nmatch = { pid = 7 }", &[]).contains("pid"));
    let group = "[auth]\nsocket_group = \"no-such-group-gpulease\"";
    assert!(error(group, &[]).contains("`auth.socket_group`: no group"));
    let numeric = load("[auth]\nsocket_group = \"4242\"", &[]).unwrap();
    assert_eq!(numeric.auth.socket_group.map(|g| g.gid), Some(4242));
    let tls = "[auth]\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"";
    assert!(error(tls, &[]).contains("`auth.tls_cert`: cannot read /nonexistent/c.pem"));
    let missing = "[consumers.x]\ntoken_file = \"/nonexistent/token\"";
    assert!(error(missing, &[]).contains("`consumers.x.token_file`"));
}
