//! Who a caller really is: the process behind a connection, from the kernel
//! rather than from the caller's word, and the check of the PID a caller
//! claims (`Acquire.client_pid`).
//!
//! - Over the Unix socket, `SO_PEERCRED` gives the caller's PID, translated
//!   by the kernel into the broker's PID namespace (the auth layer reads it).
//! - Over loopback TCP, the connection's client socket is found in
//!   `/proc/net/tcp{,6}` and its owner among the processes' descriptors
//!   (`ss -p` does the same). That costs a walk of `/proc`, so it is done at
//!   most once per connection, on a blocking thread, the first time a call
//!   on that connection needs it, and kept with the connection
//!   ([`Connections`]). Status-only connections never pay for it.
//! - A claim is believed when it names the caller itself or a descendant of
//!   it (a PID in the caller's own PID namespace is translated through
//!   `NSpid:`), or when the caller holds the admin token; for a caller that
//!   cannot be seen (remote TCP), only when its consumer's
//!   `trust_remote_pid` says so ([`attribute`]).

mod proc;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OnceCell, oneshot};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;

use crate::core::Attribution;

type Key = (SocketAddr, SocketAddr);

/// The broker's open TCP connections, by (local, remote) address, each with
/// the PID of its client once looked up. An entry lives exactly as long as
/// its connection, so a later connection from a reused port never inherits
/// an earlier one's PID.
#[derive(Clone, Debug, Default)]
pub(crate) struct Connections {
    open: Arc<Mutex<HashMap<Key, (u64, TcpPeer)>>>,
    next_id: Arc<AtomicU64>,
    lookups: Arc<Lookups>,
}

/// The client of one TCP connection.
#[derive(Clone, Debug)]
pub(crate) struct TcpPeer {
    local: SocketAddr,
    remote: SocketAddr,
    pid: Arc<OnceCell<Option<u32>>>,
    lookups: Arc<Lookups>,
}

impl TcpPeer {
    /// Whether the client is on this machine (127.0.0.0/8, ::1), where
    /// `/proc` can show its process.
    pub(crate) fn is_local(&self) -> bool {
        self.remote.ip().to_canonical().is_loopback()
    }

    /// The client's PID: looked up once per connection (on a blocking
    /// thread), then remembered; `None` for a remote client or one whose
    /// process the broker may not see. `claimed`, the PID the caller says
    /// it is, only tells where to look first: the answer is whoever holds
    /// the socket. Cancel-safe: a lookup in progress goes on for the next
    /// caller.
    pub(crate) async fn pid(&self, claimed: u32) -> Option<u32> {
        if !self.is_local() {
            return None;
        }
        *self
            .pid
            .get_or_init(|| async {
                let answer = self.lookups.ask(self.local, self.remote, claimed);
                answer.await.ok().flatten()
            })
            .await
    }
}

/// How many owners of recent connections are looked at before searching
/// every process: clients tend to open several connections.
const RECENT_OWNERS: usize = 16;

/// Lookups of connections' owners waiting to be done. One thread serves
/// them in batches: one read of `/proc/net/tcp{,6}` and at most one walk of
/// `/proc` per batch, however many connections arrived at once, so that a
/// burst of new connections costs one core at most, and usually far less.
#[derive(Debug, Default)]
struct Lookups {
    pending: Mutex<Vec<Lookup>>,
    wake: Condvar,
    /// The owners of recent connections, newest first.
    recent: Mutex<VecDeque<u32>>,
    started: std::sync::OnceLock<()>,
}

#[derive(Debug)]
struct Lookup {
    local: SocketAddr,
    remote: SocketAddr,
    claimed: u32,
    reply: oneshot::Sender<Option<u32>>,
}

impl Lookups {
    /// Asks for the owner of the connection from `remote` to `local`.
    fn ask(
        self: &Arc<Self>,
        local: SocketAddr,
        remote: SocketAddr,
        claimed: u32,
    ) -> oneshot::Receiver<Option<u32>> {
        self.started.get_or_init(|| {
            let this = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("gpulease-peers".into())
                .spawn(move || this.serve());
            if let Err(e) = spawned {
                warn!(error = %e, "cannot start the thread that finds TCP peers' processes");
            }
        });
        let (reply, answer) = oneshot::channel();
        lock(&self.pending).push(Lookup {
            local,
            remote,
            claimed,
            reply,
        });
        self.wake.notify_one();
        answer
    }

    fn serve(&self) {
        loop {
            let batch = {
                let mut pending = lock(&self.pending);
                while pending.is_empty() {
                    pending = self
                        .wake
                        .wait(pending)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
                std::mem::take(&mut *pending)
            };
            self.resolve(batch);
        }
    }

    /// The PID the caller claims, its ancestors and the owners of recent
    /// connections are looked at first, which costs a few directory reads;
    /// the sockets none of them holds are searched for among all their
    /// owners' processes, in one walk.
    fn resolve(&self, batch: Vec<Lookup>) {
        let wanted: Vec<(SocketAddr, SocketAddr)> =
            batch.iter().map(|l| (l.remote, l.local)).collect();
        let sockets = proc::client_sockets(&wanted);
        let recent: Vec<u32> = lock(&self.recent).iter().copied().collect();
        let mut owners: HashMap<String, u32> = HashMap::new();
        let mut missing = HashSet::new();
        let mut uids = HashSet::new();
        for lookup in &batch {
            let Some((socket, uid)) = sockets.get(&(lookup.remote, lookup.local)) else {
                continue;
            };
            if owners.contains_key(socket) {
                continue;
            }
            let claimed = if lookup.claimed == 0 {
                Vec::new()
            } else {
                proc::lineage(lookup.claimed, 4)
            };
            let owners_so_far: Vec<u32> = owners.values().copied().collect();
            let quick = claimed
                .into_iter()
                .chain(owners_so_far)
                .chain(recent.iter().copied())
                .find(|pid| proc::holds(*pid, socket));
            match quick {
                Some(pid) => {
                    owners.insert(socket.clone(), pid);
                }
                None => {
                    missing.insert(socket.clone());
                    uids.insert(*uid);
                }
            }
        }
        if !missing.is_empty() {
            owners.extend(proc::socket_owners(&missing, &uids));
        }
        let mut recent = lock(&self.recent);
        for lookup in batch {
            let owner = sockets
                .get(&(lookup.remote, lookup.local))
                .and_then(|(socket, _)| owners.get(socket).copied());
            if let Some(pid) = owner {
                recent.retain(|p| *p != pid);
                recent.push_front(pid);
                recent.truncate(RECENT_OWNERS);
            }
            let _ = lookup.reply.send(owner);
        }
    }
}

impl Connections {
    /// A listener whose accepted connections are registered while they are
    /// open.
    pub(crate) fn listener(&self, listener: TcpListener) -> TrackedListener {
        TrackedListener {
            listener,
            connections: self.clone(),
        }
    }

    fn register(&self, stream: TcpStream) -> io::Result<TrackedStream> {
        let (local, remote) = (stream.local_addr()?, stream.peer_addr()?);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let peer = TcpPeer {
            local,
            remote,
            pid: Arc::new(OnceCell::new()),
            lookups: Arc::clone(&self.lookups),
        };
        lock(&self.open).insert((local, remote), (id, peer));
        Ok(TrackedStream {
            stream,
            key: (local, remote),
            id,
            connections: self.clone(),
        })
    }

    /// The client of the connection that `request` came on, if it came over
    /// TCP (plain or TLS).
    pub(crate) fn peer_of<T>(&self, request: &tonic::Request<T>) -> Option<TcpPeer> {
        let extensions = request.extensions();
        let info = extensions.get::<TcpConnectInfo>().cloned().or_else(|| {
            extensions
                .get::<tonic::transport::server::TlsConnectInfo<TcpConnectInfo>>()
                .map(|tls| tls.get_ref().clone())
        })?;
        let key = (info.local_addr?, info.remote_addr?);
        lock(&self.open).get(&key).map(|(_, peer)| peer.clone())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A TCP listener whose connections are registered in [`Connections`].
#[derive(Debug)]
pub(crate) struct TrackedListener {
    listener: TcpListener,
    connections: Connections,
}

impl crate::incoming::Accept for TrackedListener {
    type Io = TrackedStream;

    async fn accept(&self) -> io::Result<TrackedStream> {
        let stream = crate::incoming::Accept::accept(&self.listener).await?;
        self.connections.register(stream)
    }
}

/// An accepted TCP stream, registered in [`Connections`] until dropped.
/// Reads and writes go straight to the socket.
#[derive(Debug)]
pub(crate) struct TrackedStream {
    stream: TcpStream,
    key: Key,
    id: u64,
    connections: Connections,
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        let mut open = lock(&self.connections.open);
        // Only this connection's entry: a new connection from the same port
        // may have been accepted once the kernel closed this one.
        if open.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            open.remove(&self.key);
        }
    }
}

impl Connected for TrackedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// What the broker knows of a caller when it decides whose a lease is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seen {
    /// The caller's own PID and how the kernel gave it; `None` when it
    /// cannot be seen (remote TCP, or a process the broker may not inspect).
    pub kernel: Option<(u32, Attribution)>,
    /// The PID the caller claims; 0 for none.
    pub claimed: u32,
    /// Whether the caller holds the admin token.
    pub admin: bool,
    /// Whether the consumer's claims are trusted when the caller cannot be
    /// seen (`trust_remote_pid`).
    pub trust_remote: bool,
}

/// What [`decide`] recorded for a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Decision {
    /// The PID to record; 0 when none is known.
    pub pid: u32,
    /// How it was found; `None` when no PID is known.
    pub attribution: Option<Attribution>,
    /// Whether a claim was made and not believed.
    pub ignored: bool,
}

/// The PID to record for a lease and how it was found, from what is `seen`;
/// `relate(peer, claimed)` finds the process a claim names, if it is the
/// peer or a descendant of it. Blocking (reads `/proc` through `relate`).
pub(crate) fn decide(seen: Seen, relate: impl Fn(u32, u32) -> Option<u32>) -> Decision {
    let claimed = seen.claimed;
    let decision = |pid, attribution, ignored| Decision {
        pid,
        attribution,
        ignored,
    };
    match seen.kernel {
        Some((peer, how)) if claimed == 0 || claimed == peer => decision(peer, Some(how), false),
        _ if seen.admin && claimed != 0 => {
            decision(claimed, Some(Attribution::UncheckedHint), false)
        }
        Some((peer, how)) => match relate(peer, claimed) {
            // The caller's own PID in its namespace: the kernel's word.
            Some(pid) if pid == peer => decision(peer, Some(how), false),
            Some(pid) => decision(pid, Some(Attribution::CheckedHint), false),
            None => decision(peer, Some(how), true),
        },
        None if claimed != 0 && seen.trust_remote => {
            decision(claimed, Some(Attribution::UncheckedHint), false)
        }
        None => decision(0, None, claimed != 0),
    }
}

/// The process that `claimed` names, if it is `peer` or a descendant of it:
/// a PID of the broker's namespace, or, for a peer in a nested PID
/// namespace (a container), a PID of the peer's own namespace.
pub(crate) fn relate(peer: u32, claimed: u32) -> Option<u32> {
    if claimed == peer {
        return Some(peer);
    }
    if proc::ns_pids(peer).len() > 1
        && let Some(pid) = proc::translate_from_namespace(peer, claimed)
    {
        return Some(pid);
    }
    proc::descends_from(claimed, peer).then_some(claimed)
}

/// [`decide`] with [`relate`] on a blocking thread, logging a claim that
/// was not believed.
pub(crate) async fn attribute(seen: Seen, consumer: &str) -> Decision {
    let needs_proc = seen.claimed != 0
        && !seen.admin
        && seen.kernel.is_some_and(|(peer, _)| peer != seen.claimed);
    let decision = if needs_proc {
        tokio::task::spawn_blocking(move || decide(seen, relate))
            .await
            .unwrap_or_else(|_| decide(seen, |_, _| None))
    } else {
        decide(seen, |_, _| None)
    };
    if decision.ignored {
        match seen.kernel {
            Some((peer, how)) => warn!(
                %consumer, claimed = seen.claimed, recorded = peer, how = %how,
                "ignoring the client_pid the caller claims: it is neither the caller nor a descendant of it"
            ),
            None => warn!(
                %consumer, claimed = seen.claimed,
                "ignoring the client_pid of a caller whose process cannot be seen (the consumer's trust_remote_pid would believe it)"
            ),
        }
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(kernel: Option<(u32, Attribution)>, claimed: u32) -> Seen {
        Seen {
            kernel,
            claimed,
            admin: false,
            trust_remote: false,
        }
    }

    #[test]
    fn a_claim_is_believed_only_when_it_can_be_checked_or_is_trusted() {
        use Attribution::*;
        // 100 is the caller; 101 its child; 7 its own PID in its container;
        // 555 someone else.
        let relate = |peer: u32, claimed: u32| match (peer, claimed) {
            (100, 101) => Some(101),
            (100, 7) => Some(100),
            _ => None,
        };
        let unix = Some((100, PeerCredentials));
        let tcp = Some((100, SocketLookup));
        let check = |seen: Seen, pid: u32, how: Option<Attribution>, ignored: bool| {
            let decision = decide(seen, relate);
            assert_eq!(
                decision,
                Decision {
                    pid,
                    attribution: how,
                    ignored
                },
                "{seen:?}"
            );
        };
        check(seen(unix, 0), 100, Some(PeerCredentials), false);
        check(seen(unix, 100), 100, Some(PeerCredentials), false);
        check(seen(unix, 555), 100, Some(PeerCredentials), true);
        check(seen(tcp, 555), 100, Some(SocketLookup), true);
        check(seen(unix, 101), 101, Some(CheckedHint), false);
        check(seen(tcp, 7), 100, Some(SocketLookup), false);
        let admin = Seen {
            admin: true,
            ..seen(tcp, 555)
        };
        check(admin, 555, Some(UncheckedHint), false);
        // Remote: believed only where the consumer is trusted.
        check(seen(None, 555), 0, None, true);
        let trusted = Seen {
            trust_remote: true,
            ..seen(None, 555)
        };
        check(trusted, 555, Some(UncheckedHint), false);
        check(seen(None, 0), 0, None, false);
    }

    #[test]
    fn relates_children_and_refuses_strangers() {
        let me = std::process::id();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        assert_eq!(relate(me, child.id()), Some(child.id()));
        let parent = std::os::unix::process::parent_id();
        assert_eq!(relate(me, parent), None);
        assert_eq!(relate(me, me), Some(me));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
