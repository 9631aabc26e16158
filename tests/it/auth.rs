//! Authentication and authorisation: bearer tokens, the operator's
//! RevokeLease, Unix peer credentials, and TLS — from tonic, the CLI, and
//! the Unix socket.

use std::path::Path;
use std::process::Output;

use gpulease_client::pb::v1 as pb;
use gpulease_client::pb::v1::lease_request::Kind as RequestKind;
use gpulease_client::{ConnectOptions, connect_with};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::support::{BIN, Broker, Call, Options, acquire};

const TOKENS: &str = r#"
[auth]
admin_token = "admin-secret"

[consumers.mvoice]
kind = "tts"
token = "mvoice-secret"

[consumers.comfyui]
kind = "image"
token_file = "comfyui.token"
"#;

async fn broker(config: &str) -> Broker {
    Broker::start_with(Options {
        config: Some(config),
        socket: true,
        ..Options::default()
    })
    .await
}

async fn with_token(broker: &Broker, token: Option<&str>) -> gpulease_client::Client {
    let options = ConnectOptions {
        token: token.map(str::to_owned),
        ..ConnectOptions::default()
    };
    connect_with(&broker.addr, &options).await.unwrap()
}

/// Opens AcquireLease for `consumer` with `token` and returns the first
/// event or the error.
async fn try_acquire(
    broker: &Broker,
    token: Option<&str>,
    consumer: &str,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel(1);
    tx.send(pb::LeaseRequest {
        kind: Some(RequestKind::Acquire(acquire(consumer))),
    })
    .await
    .unwrap();
    let mut events = with_token(broker, token)
        .await
        .acquire_lease(ReceiverStream::new(rx))
        .await?
        .into_inner();
    events.message().await?.expect("an event");
    Ok(())
}

#[tokio::test]
async fn tokens_are_required_and_must_match_the_consumer() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("comfyui.token"), "comfyui-secret\n").unwrap();
    let config = TOKENS.replace(
        "comfyui.token",
        &dir.path().join("comfyui.token").display().to_string(),
    );
    let broker = broker(&config).await;

    let none = try_acquire(&broker, None, "mvoice").await.unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated, "{none:?}");
    let wrong = try_acquire(&broker, Some("guess"), "mvoice")
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    let other = try_acquire(&broker, Some("mvoice-secret"), "comfyui")
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
    assert!(
        other.message().contains("belongs to consumer \"mvoice\""),
        "{other:?}"
    );
    try_acquire(&broker, Some("mvoice-secret"), "mvoice")
        .await
        .unwrap();
    // The token from the file, trimmed.
    broker
        .wait_for("mvoice's lease gone", |s| s.in_flight == 0)
        .await;
    try_acquire(&broker, Some("comfyui-secret"), "comfyui")
        .await
        .unwrap();

    // Status is open unless configured otherwise.
    with_token(&broker, None)
        .await
        .status(pb::StatusRequest::default())
        .await
        .unwrap();

    // The CLI: a token file works, no token is refused with exit 77.
    let token_file = dir.path().join("mvoice.token");
    std::fs::write(&token_file, "mvoice-secret").unwrap();
    let run = |extra: Vec<String>| {
        let mut command = Command::new(BIN);
        command
            .args([
                "run",
                "--broker",
                &broker.addr,
                "--consumer",
                "mvoice",
                "--quiet",
            ])
            .args(extra)
            .args(["--", "true"]);
        command
    };
    let refused = run(vec![]).output().await.unwrap();
    assert_eq!(refused.status.code(), Some(77), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"));
    let token_arg = vec!["--token-file".to_owned(), token_file.display().to_string()];
    let allowed = run(token_arg).output().await.unwrap();
    assert!(allowed.status.success(), "{allowed:?}");
}

#[tokio::test]
async fn status_can_require_a_token() {
    let config = format!("{TOKENS}\n").replace(
        "admin_token = \"admin-secret\"",
        "admin_token = \"admin-secret\"\nstatus_requires_token = true",
    );
    let config = config.replace("token_file = \"comfyui.token\"", "token = \"c\"");
    let broker = broker(&config).await;
    let refused = with_token(&broker, None)
        .await
        .status(pb::StatusRequest::default())
        .await;
    assert_eq!(refused.unwrap_err().code(), Code::Unauthenticated);
    with_token(&broker, Some("c"))
        .await
        .status(pb::StatusRequest::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn the_operator_revokes_a_lease_once_and_stale_names_change_nothing() {
    let config = TOKENS.replace("token_file = \"comfyui.token\"", "token = \"c\"");
    let broker = broker(&config).await;
    let mut holder = Call::open_with_client(
        with_token(&broker, Some("mvoice-secret")).await,
        acquire("mvoice"),
    )
    .await
    .unwrap();
    let granted = holder.granted().await;
    let revoke = |token: Option<&'static str>, lease_id: String| {
        let broker = &broker;
        async move {
            with_token(broker, token)
                .await
                .revoke_lease(pb::RevokeLeaseRequest {
                    lease_id,
                    fencing_token: 0,
                    message: "maintenance".into(),
                })
                .await
        }
    };
    let nobody = revoke(None, granted.lease_id.clone()).await.unwrap_err();
    assert_eq!(nobody.code(), Code::Unauthenticated);
    let consumer = revoke(Some("c"), granted.lease_id.clone())
        .await
        .unwrap_err();
    assert_eq!(consumer.code(), Code::PermissionDenied);

    let done = revoke(Some("admin-secret"), granted.lease_id.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(done.revoked, "{done:?}");
    assert_eq!(done.consumer, "mvoice");
    match holder.next().await {
        Ok(Some(pb::lease_event::Kind::Revoked(revoked))) => {
            assert_eq!(revoked.reason(), pb::RevokeReason::Admin);
            assert!(revoked.message.ends_with("maintenance"), "{revoked:?}");
        }
        other => panic!("expected Revoked, got {other:?}"),
    }
    holder.ends_with(Code::Aborted).await;

    // Again: nothing is held under that name any more.
    let again = revoke(Some("admin-secret"), granted.lease_id.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!again.revoked);
    assert!(again.message.contains("is not held"), "{again:?}");
    // A lease id from another start of the broker is never this one.
    let (_, token) = granted.lease_id.split_once('-').unwrap();
    let stale = revoke(Some("admin-secret"), format!("1-{token}"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !stale.revoked && stale.message.contains("earlier start"),
        "{stale:?}"
    );
    let status = broker.status_with(Some("c")).await;
    assert_eq!(status.ended.unwrap().revoked, 1);
}

#[tokio::test]
async fn over_the_unix_socket_peer_credentials_decide() {
    let config = r#"
[auth]
socket_mode = "0666"
[consumers.rootonly]
unix_users = ["root"]
[consumers.nobodys]
unix_users = ["nobody"]
"#;
    let broker = broker(config).await;
    let socket = format!("unix:{}", broker.socket.as_ref().unwrap().display());
    let as_nobody = |consumer: &str| {
        let mut command = Command::new("setpriv");
        command
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
            .args([
                "run",
                "--broker",
                &socket,
                "--consumer",
                consumer,
                "--quiet",
            ])
            .args(["--", "true"]);
        command
    };
    let denied: Output = as_nobody("rootonly").output().await.unwrap();
    assert_eq!(denied.status.code(), Some(77), "{denied:?}");
    assert!(String::from_utf8_lossy(&denied.stderr).contains("uid 65534 may not act as consumer"));
    let allowed = as_nobody("nobodys").output().await.unwrap();
    assert!(allowed.status.success(), "{allowed:?}");

    // Over TCP, a consumer bound to Unix users is refused.
    let tcp = try_acquire(&broker, None, "rootonly").await.unwrap_err();
    assert_eq!(tcp.code(), Code::PermissionDenied);

    // The socket's owner (the broker's user, here root) is the operator.
    let revoke = Command::new(BIN)
        .args(["revoke", "--broker", &socket, "12345"])
        .output()
        .await
        .unwrap();
    assert_eq!(revoke.status.code(), Some(1), "{revoke:?}");
    assert!(String::from_utf8_lossy(&revoke.stdout).contains("is not held"));
    let tcp_revoke = Command::new(BIN)
        .args(["revoke", "--broker", &broker.addr, "12345"])
        .output()
        .await
        .unwrap();
    assert_eq!(tcp_revoke.status.code(), Some(77), "{tcp_revoke:?}");
}

#[tokio::test]
async fn the_default_socket_mode_keeps_other_users_out() {
    let broker = Broker::start_with(Options {
        socket: true,
        ..Options::default()
    })
    .await;
    let socket = format!("unix:{}", broker.socket.as_ref().unwrap().display());
    // The test's temporary directory must be reachable for the check to
    // be about the socket's own mode.
    make_traversable(broker.dir.path());
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
        .args(["status", "--broker", &socket])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(69), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("Permission denied"),
        "{output:?}"
    );
}

fn make_traversable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A CA, a server certificate for 127.0.0.1 signed by it, and a client
/// certificate signed by it, written as PEM files into `dir`.
pub(crate) fn certificates(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (name, san) in [("server", "127.0.0.1"), ("client", "client")] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![san.to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

#[tokio::test]
async fn tls_and_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let p = |name: &str| dir.path().join(name);
    let config = format!(
        "[auth]\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{}\"\n",
        p("server.pem").display(),
        p("server.key").display(),
        p("ca.pem").display()
    );
    let broker = broker(&config).await;
    let https = format!("https://{}", broker.addr);

    let with_identity = ConnectOptions {
        ca: Some(p("ca.pem")),
        identity: Some((p("client.pem"), p("client.key"))),
        ..ConnectOptions::default()
    };
    let mut client = connect_with(&https, &with_identity).await.unwrap();
    client.status(pb::StatusRequest::default()).await.unwrap();

    // Without a client certificate, the handshake fails.
    let without = ConnectOptions {
        ca: Some(p("ca.pem")),
        ..ConnectOptions::default()
    };
    let refused = match connect_with(&https, &without).await {
        Err(_) => true,
        Ok(mut client) => client.status(pb::StatusRequest::default()).await.is_err(),
    };
    assert!(refused, "a client without a certificate got through");
    // Plain HTTP/2 on the TLS port gets nowhere either.
    let plain = match gpulease_client::connect(&broker.addr).await {
        Err(_) => true,
        Ok(mut client) => client.status(pb::StatusRequest::default()).await.is_err(),
    };
    assert!(plain, "a plaintext client got through");

    // The CLI, with the same files.
    let output = Command::new(BIN)
        .args(["status", "--broker", &https, "--ca"])
        .arg(p("ca.pem"))
        .arg("--cert")
        .arg(p("client.pem"))
        .arg("--key")
        .arg(p("client.key"))
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
}

#[tokio::test]
async fn over_tls_a_connection_without_a_preface_is_closed_too() {
    use tokio::io::AsyncReadExt as _;
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let p = |name: &str| dir.path().join(name);
    let config = format!(
        "[auth]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        p("server.pem").display(),
        p("server.key").display(),
    );
    let broker = broker(&config).await;
    // A real client is served.
    let https = format!("https://{}", broker.addr);
    let options = ConnectOptions {
        ca: Some(p("ca.pem")),
        ..ConnectOptions::default()
    };
    let mut client = connect_with(&https, &options).await.unwrap();
    client.status(pb::StatusRequest::default()).await.unwrap();

    // One that never starts the TLS handshake, and one that completes it
    // but never sends the HTTP/2 preface inside it.
    let silent = tokio::net::TcpStream::connect(&broker.addr).await.unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(p("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(&broker.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let handshaken = connector.connect(name, tcp).await.unwrap();
    let closed = |mut stream: Box<dyn tokio::io::AsyncRead + Unpin + Send>| async move {
        let mut buf = [0u8; 512];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(crate::support::PATIENCE, async {
        tokio::join!(closed(Box::new(silent)), closed(Box::new(handshaken)))
    })
    .await
    .expect("the broker kept a TLS connection without a preface open");
    client.status(pb::StatusRequest::default()).await.unwrap();
}
