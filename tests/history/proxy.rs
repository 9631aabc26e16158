//! A TCP proxy on loopback in front of the broker, for one client: it
//! forwards, delays, or blackholes (stops forwarding both ways but keeps
//! both sockets open, as a cut network cable would look to each side).
//!
//! Each new connection goes to the broker generation current at the time,
//! so a client behind the proxy follows the broker across restarts.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the proxy does with a connection's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Forward at once.
    Forward,
    /// Forward each chunk after this delay.
    Delay(Duration),
    /// Forward nothing, ever again; keep the sockets open.
    Blackhole,
}

/// One client's proxy. Dropping it closes every connection.
#[derive(Debug)]
pub(crate) struct Proxy {
    addr: String,
    connections: Arc<Mutex<Vec<watch::Sender<Mode>>>>,
    stop: CancellationToken,
}

impl Proxy {
    /// A proxy on `127.0.0.1:0` to whatever `target` names when a client
    /// connects; new connections start in `mode`.
    pub(crate) async fn start(target: watch::Receiver<Option<String>>, mode: Mode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("a bound address").to_string();
        let connections: Arc<Mutex<Vec<watch::Sender<Mode>>>> = Arc::default();
        let stop = CancellationToken::new();
        let accepting = Arc::clone(&connections);
        let accept_stop = stop.clone();
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => continue,
                    },
                    () = accept_stop.cancelled() => return,
                };
                let Some(upstream) = target.borrow().clone() else {
                    continue;
                };
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (modes, mode_rx) = watch::channel(mode);
                accepting.lock().unwrap().push(modes);
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                for (from, to) in [(client_read, server_write), (server_read, client_write)] {
                    let modes = mode_rx.clone();
                    let stop = accept_stop.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            () = pipe(from, to, modes) => {}
                            () = stop.cancelled() => {}
                        }
                    });
                }
            }
        });
        Self {
            addr,
            connections,
            stop,
        }
    }

    /// The address clients connect to.
    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// Blackholes every connection open now; later ones are forwarded.
    pub(crate) fn blackhole(&self) {
        for connection in self.connections.lock().unwrap().drain(..) {
            // The receivers keep the connection's sockets; this sender is
            // dropped, which only means the mode never changes again.
            let _ = connection.send(Mode::Blackhole);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut mode: watch::Receiver<Mode>) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        loop {
            let current = *mode.borrow_and_update();
            match current {
                Mode::Forward => break,
                Mode::Delay(delay) => {
                    tokio::time::sleep(delay).await;
                    break;
                }
                // Hold the bytes and both sockets until the proxy is dropped.
                Mode::Blackhole => std::future::pending::<()>().await,
            }
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
