//! `gpulease gate` in front of a fake ollama-like server that streams NDJSON
//! slowly: curl through the gate (NDJSON, server-sent events, a binary body
//! both ways), one lease shared by concurrent requests,
//! the linger, a client that leaves mid-stream, and `--max-wait`.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::Notify;

use crate::support::{BIN, Broker, Call, PATIENCE, acquire};

/// The lines the fake server streams for `/api/generate`.
fn ndjson_lines() -> Vec<String> {
    (0..5)
        .map(|i| {
            format!(
                "{{\"model\":\"m\",\"response\":\"tok{i} é\",\"done\":{}}}\n",
                i == 4
            )
        })
        .collect()
}

/// The server-sent events the fake server streams for `/events`.
fn sse_events() -> Vec<String> {
    (0..4)
        .map(|i| format!("event: token\ndata: {{\"i\": {i}}}\n\n"))
        .collect()
}

/// A fake ollama: `/api/generate` streams five NDJSON lines 30 ms apart
/// (chunked); `/hold` sends one line, then the rest once `release` is
/// notified. Counts the connections that ended before their response did.
struct Upstream {
    addr: String,
    release: Arc<Notify>,
    cut_off: Arc<Notify>,
}

impl Upstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let release = Arc::new(Notify::new());
        let cut_off = Arc::new(Notify::new());
        let (r, c) = (Arc::clone(&release), Arc::clone(&cut_off));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (release, cut_off) = (Arc::clone(&r), Arc::clone(&c));
                tokio::spawn(serve_one(stream, release, cut_off));
            }
        });
        Self {
            addr,
            release,
            cut_off,
        }
    }
}

async fn serve_one(stream: TcpStream, release: Arc<Notify>, cut_off: Arc<Notify>) {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).await.unwrap();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await.unwrap();
    let mut stream = reader.into_inner();
    if request_line.contains("/echo") {
        // The request body back, every byte, with its length.
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&body).await.unwrap();
        return;
    }
    if request_line.contains("/events") {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
        stream.write_all(head.as_bytes()).await.unwrap();
        for event in sse_events() {
            let chunk = format!("{:x}\r\n{event}\r\n", event.len());
            stream.write_all(chunk.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stream.write_all(b"0\r\n\r\n").await;
        return;
    }
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let hold = request_line.contains("/hold");
    for (i, line) in ndjson_lines().iter().enumerate() {
        if hold && i == 1 {
            release.notified().await;
        } else if i > 0 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let chunk = format!("{:x}\r\n{line}\r\n", line.len());
        if stream.write_all(chunk.as_bytes()).await.is_err() {
            cut_off.notify_one();
            return;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
}

/// `gpulease gate --config FILE` takes everything from the file's `[gate]`
/// section, as a systemd unit runs it.
#[tokio::test]
async fn the_gate_runs_from_the_gate_section_of_a_config_file() {
    let broker = Broker::start().await;
    let upstream = Upstream::start().await;
    let config = broker.path("gate.toml");
    std::fs::write(
        &config,
        format!(
            "[gate]\nconsumer = \"ollama\"\nlisten = \"127.0.0.1:0\"\nupstream = \"http://{}\"\nlinger = \"0s\"\nbroker = \"{}\"\n",
            upstream.addr, broker.addr
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .arg("gate")
        .arg("--config")
        .arg(&config)
        .env_remove("GPULEASE_BROKER")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let addr = line.strip_prefix("listening on ").unwrap();
    let (head, body) = curl(addr, "/api/generate").await;
    assert_eq!(body, ndjson_lines().concat().into_bytes());
    assert!(header(&head, "x-gpulease-token").is_some(), "{head}");
    let status = broker
        .wait_for("the gate's lease released", |s| {
            s.total_grants == 1 && s.in_flight == 0
        })
        .await;
    assert_eq!(status.consumers[0].name, "ollama");
    // A bad section is refused before anything is bound.
    std::fs::write(&config, "[gate]\nupstream = \"ftp://nowhere\"\n").unwrap();
    let refused = Command::new(BIN)
        .arg("gate")
        .arg("--config")
        .arg(&config)
        .output()
        .await
        .unwrap();
    assert_eq!(refused.status.code(), Some(64));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("gate.upstream"), "{said}");
}

/// A `gpulease gate` process, killed when dropped.
struct Gate {
    _child: Child,
    addr: String,
}

impl Gate {
    async fn start(broker: &Broker, upstream: &Upstream, extra: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(["gate", "--broker", &broker.addr, "--consumer", "ollama"])
            .args(["--listen", "127.0.0.1:0", "--upstream"])
            .arg(format!("http://{}", upstream.addr))
            .args(extra)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .expect("the gate did not print its address")
            .unwrap()
            .unwrap();
        let addr = line.strip_prefix("listening on ").unwrap().to_owned();
        Self {
            _child: child,
            addr,
        }
    }
}

/// curl's `-D -` output and body, for a POST of `path` through the gate.
async fn curl(gate: &str, path: &str) -> (String, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let headers = dir.path().join("headers");
    let output = Command::new("curl")
        .args(["-sS", "-N", "-D"])
        .arg(&headers)
        .arg(format!("http://{gate}{path}"))
        .args(["-d", r#"{"model":"m","prompt":"hi"}"#])
        .output()
        .await
        .expect("curl is installed");
    assert!(output.status.success(), "{output:?}");
    (std::fs::read_to_string(headers).unwrap(), output.stdout)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

#[tokio::test]
async fn curl_through_the_gate_gets_the_bytes_unchanged_and_the_lease_headers() {
    let broker = Broker::start().await;
    let upstream = Upstream::start().await;
    let gate = Gate::start(&broker, &upstream, &["--linger", "0s"]).await;
    let (head, body) = curl(&gate.addr, "/api/generate").await;
    assert_eq!(body, ndjson_lines().concat().into_bytes());
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let token: u64 = header(&head, "x-gpulease-token").unwrap().parse().unwrap();
    assert!(token > 0);
    header(&head, "x-gpulease-waited-ms")
        .unwrap()
        .parse::<u64>()
        .unwrap();
    assert_eq!(header(&head, "content-type"), Some("application/x-ndjson"));
    let status = broker
        .wait_for("the gate's lease released", |s| {
            s.in_flight == 0 && s.total_grants == 1
        })
        .await;
    assert_eq!(status.ended.unwrap().released, 1);
}

#[tokio::test]
async fn concurrent_requests_share_one_lease_and_the_linger_holds_it() {
    let broker = Broker::start().await;
    let upstream = Upstream::start().await;
    let gate = Gate::start(&broker, &upstream, &["--linger", "3s"]).await;
    let first = tokio::spawn({
        let addr = gate.addr.clone();
        async move { curl(&addr, "/hold").await }
    });
    broker
        .wait_for("the gate holding", |s| {
            s.holders.iter().any(|h| h.consumer == "ollama")
        })
        .await;
    let second = tokio::spawn({
        let addr = gate.addr.clone();
        async move { curl(&addr, "/api/generate").await }
    });
    let (head, _) = second.await.unwrap();
    upstream.release.notify_one();
    let (first_head, first_body) = first.await.unwrap();
    assert_eq!(first_body, ndjson_lines().concat().into_bytes());
    assert_eq!(
        header(&head, "x-gpulease-token"),
        header(&first_head, "x-gpulease-token"),
        "two leases for two concurrent requests"
    );
    // The lease lingers: another consumer waits for it to end.
    let mut other = Call::open(&broker, acquire("tts")).await.unwrap();
    let queued = other.queued().await;
    assert_eq!(queued.holders[0].consumer, "ollama");
    other.granted().await;
    let status = broker.status().await;
    assert_eq!(status.total_grants, 2, "the gate took one lease in all");
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_releases_the_lease() {
    let broker = Broker::start().await;
    let upstream = Upstream::start().await;
    let gate = Gate::start(&broker, &upstream, &["--linger", "0s"]).await;
    let mut stream = TcpStream::connect(&gate.addr).await.unwrap();
    let request = format!(
        "POST /hold HTTP/1.1\r\nHost: {}\r\nContent-Length: 2\r\n\r\n{{}}",
        gate.addr
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut first = vec![0; 64];
    let n = stream.read(&mut first).await.unwrap();
    assert!(n > 0 && first.starts_with(b"HTTP/1.1 200"));
    broker
        .wait_for("the gate holding", |s| s.in_flight == 1)
        .await;
    drop(stream);
    // The upstream goes on; its next write finds the gate gone.
    upstream.release.notify_one();
    tokio::time::timeout(PATIENCE, upstream.cut_off.notified())
        .await
        .expect("the upstream's connection was not closed");
    broker
        .wait_for("the lease released", |s| s.in_flight == 0)
        .await;
}

#[tokio::test]
async fn past_max_wait_the_gate_answers_503_with_retry_after() {
    let broker = Broker::start().await;
    let upstream = Upstream::start().await;
    let gate = Gate::start(&broker, &upstream, &["--max-wait", "300ms"]).await;
    let mut holder = Call::open(&broker, acquire("tts")).await.unwrap();
    holder.granted().await;
    let (head, body) = curl(&gate.addr, "/api/generate").await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert_eq!(header(&head, "retry-after"), Some("1"));
    let body = String::from_utf8(body).unwrap();
    assert!(body.contains("\"error\""), "{body}");
    // The gate's request left the queue.
    broker.wait_for("no waiter", |s| s.queue_depth == 0).await;
    holder.release().await;
}

#[tokio::test]
async fn server_sent_events_and_binary_bodies_pass_through_unchanged() {
    let broker = Broker::start().await;
    let upstream = Upstream::start().await;
    let gate = Gate::start(&broker, &upstream, &["--linger", "0s"]).await;
    let (head, body) = curl(&gate.addr, "/events").await;
    assert_eq!(body, sse_events().concat().into_bytes());
    assert_eq!(header(&head, "content-type"), Some("text/event-stream"));

    // 256 KiB of every byte value, up to the server and back.
    let dir = tempfile::tempdir().unwrap();
    let sent: Vec<u8> = (0..256 * 1024).map(|i: u32| (i * 7 % 251) as u8).collect();
    let file = dir.path().join("blob");
    std::fs::write(&file, &sent).unwrap();
    let headers = dir.path().join("headers");
    let output = Command::new("curl")
        .args(["-sS", "-D"])
        .arg(&headers)
        .arg(format!("http://{}/echo", gate.addr))
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(output.stdout == sent, "the body came back changed");
    let head = std::fs::read_to_string(headers).unwrap();
    assert_eq!(header(&head, "content-length"), Some("262144"), "{head}");
}
