//! Accepting connections, for careless and hostile clients: the accept loop
//! backs off (and says so, rate-limited) when the process runs out of file
//! descriptors instead of spinning, and a connection that has not sent a
//! complete HTTP/2 preface within [`HANDSHAKE_TIMEOUT`] is closed, so that
//! connections that say nothing (or trickle a byte a second) cannot pile up.
//!
//! The accepted connections are handed to tonic as a stream, in place of its
//! own `TcpIncoming`, which retries a failing `accept` at once and logs
//! nothing. Over TLS the broker runs the handshake itself ([`incoming_tls`])
//! rather than tonic, so that the preface deadline applies inside TLS too:
//! the handshake and the preface share one deadline.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tracing::{debug, error};

/// How long a new connection has to send the complete HTTP/2 connection
/// preface (the 24-byte magic and its first SETTINGS frame). Every real
/// client sends it at once.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The first backoff after `accept` failed for want of file descriptors.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);

/// The longest backoff: how late, at most, the broker accepts again once
/// descriptors are free.
const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// At most one error line per this long while `accept` keeps failing.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Accepted connections, ready for `serve_with_incoming_shutdown`.
pub(crate) type Incoming<IO> = ReceiverStream<io::Result<Guarded<IO>>>;

/// A listener the accept loop can take connections from.
pub(crate) trait Accept: Send + 'static {
    /// The connection.
    type Io: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static;

    /// The next connection.
    fn accept(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Accept for TcpListener {
    type Io = TcpStream;

    async fn accept(&self) -> io::Result<TcpStream> {
        let (stream, _) = TcpListener::accept(self).await?;
        // Small messages (a grant, a release) must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

impl Accept for UnixListener {
    type Io = UnixStream;

    async fn accept(&self) -> io::Result<UnixStream> {
        Ok(UnixListener::accept(self).await?.0)
    }
}

/// Accepts connections from `listener` until `stop` is cancelled (which
/// closes the listener, while the stream stays open until it is dropped) or
/// the returned stream is dropped. Each connection
/// must send its HTTP/2 preface within `preface` when given; `None` is for
/// the raw connections under TLS (see [`incoming_tls`]).
pub(crate) fn incoming<L: Accept>(
    listener: L,
    preface: Option<Duration>,
    stop: CancellationToken,
) -> Incoming<L::Io> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(accept_loop(listener, tx, preface, stop));
    ReceiverStream::new(rx)
}

/// The same for TLS: each connection accepted on `listener` is handed to
/// tonic once its TLS handshake is done, and must have completed that
/// handshake and sent its HTTP/2 preface (inside TLS) within `deadline` of
/// being accepted. Handshakes run concurrently, so a slow one holds up no
/// other.
pub(crate) fn incoming_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    deadline: Duration,
    stop: CancellationToken,
) -> Incoming<TlsStream<Guarded<TcpStream>>> {
    let (tx, rx) = mpsc::channel(16);
    let mut accepted = incoming(listener, None, stop);
    tokio::spawn(async move {
        loop {
            let io = tokio::select! {
                io = accepted.next() => match io {
                    Some(Ok(io)) => io,
                    Some(Err(_)) => continue,
                    None => return,
                },
                // tonic has stopped serving.
                () = tx.closed() => return,
            };
            let until = Instant::now() + deadline;
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout_at(until, acceptor.accept(io)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(Guarded::until(tls, Some(until)))).await;
                    }
                    Ok(Err(e)) => debug!(error = %e, "TLS handshake failed"),
                    Err(_) => {
                        debug!("closing a connection whose TLS handshake did not finish in time")
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

async fn accept_loop<L: Accept>(
    listener: L,
    connections: mpsc::Sender<io::Result<Guarded<L::Io>>>,
    preface: Option<Duration>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
            () = connections.closed() => return,
        };
        match accepted {
            Ok(io) => {
                backoff.succeeded();
                let io = Guarded::new(io, preface);
                if connections.send(Ok(io)).await.is_err() {
                    return;
                }
            }
            Err(e) if out_of_descriptors(&e) => {
                let pause = backoff.failed(&e);
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = stop.cancelled() => break,
                }
            }
            // A connection that was reset before it was accepted, and the
            // like: nothing to do about it but take the next one.
            Err(e) => debug!(error = %e, "accept failed"),
        }
    }
    // Stop accepting (closing the listener), but keep the stream open:
    // tonic takes the end of its incoming connections as the signal to
    // close every connection (GOAWAY), which comes later, once every
    // stream has had its last word.
    drop(listener);
    connections.closed().await;
}

/// Whether `accept` failed because this process (EMFILE) or the system
/// (ENFILE) has no file descriptor left: retrying at once only spins.
fn out_of_descriptors(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(code) if code == nix::errno::Errno::EMFILE as i32 || code == nix::errno::Errno::ENFILE as i32
    )
}

/// Exponential backoff for `accept`, with a rate-limited error line.
#[derive(Debug, Default)]
struct Backoff {
    pause: Option<Duration>,
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl Backoff {
    /// Records a failure; returns how long to pause.
    fn failed(&mut self, error: &io::Error) -> Duration {
        let pause = self
            .pause
            .map_or(FIRST_BACKOFF, |pause| (pause * 2).min(MAX_BACKOFF));
        self.pause = Some(pause);
        let now = Instant::now();
        if self
            .last_logged
            .is_none_or(|at| now.duration_since(at) >= ERROR_LOG_INTERVAL)
        {
            error!(
                error = %error,
                failures_since_last_message = self.unlogged + 1,
                backoff_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
                "cannot accept connections: out of file descriptors; backing off"
            );
            self.last_logged = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        pause
    }

    fn succeeded(&mut self) {
        self.pause = None;
    }
}

/// A connection that must send its HTTP/2 preface before a deadline: until
/// it has, a read after the deadline fails, which makes the HTTP/2 server
/// close it.
#[derive(Debug)]
pub(crate) struct Guarded<IO> {
    io: IO,
    preface: Option<PrefaceDeadline>,
}

#[derive(Debug)]
struct PrefaceDeadline {
    deadline: Pin<Box<Sleep>>,
    /// Bytes read so far.
    read: usize,
    /// The first frame's 9-byte header, as far as it was read.
    header: [u8; 9],
}

/// The client's connection preface starts with these 24 bytes (RFC 9113,
/// 3.4), followed by a SETTINGS frame.
const MAGIC_LEN: usize = 24;

impl PrefaceDeadline {
    /// Takes in newly read bytes; returns whether the preface is complete.
    fn read(&mut self, bytes: &[u8]) -> bool {
        for byte in bytes {
            if let Some(slot) = self
                .read
                .checked_sub(MAGIC_LEN)
                .and_then(|at| self.header.get_mut(at))
            {
                *slot = *byte;
            }
            self.read += 1;
        }
        let header_end = MAGIC_LEN + self.header.len();
        if self.read < header_end {
            return false;
        }
        let length = u32::from_be_bytes([0, self.header[0], self.header[1], self.header[2]]);
        self.read >= header_end + length as usize
    }
}

impl<IO> Guarded<IO> {
    fn new(io: IO, preface: Option<Duration>) -> Self {
        Self::until(io, preface.map(|timeout| Instant::now() + timeout))
    }

    fn until(io: IO, deadline: Option<Instant>) -> Self {
        Self {
            io,
            preface: deadline.map(|deadline| PrefaceDeadline {
                deadline: Box::pin(tokio::time::sleep_until(deadline)),
                read: 0,
                header: [0; 9],
            }),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(preface) = &mut this.preface
            && preface.deadline.as_mut().poll(cx).is_ready()
        {
            debug!("closing a connection that sent no HTTP/2 preface in time");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no complete HTTP/2 preface within the handshake timeout",
            )));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if let Some(preface) = &mut this.preface
            && preface.read(&buf.filled()[before..])
        {
            this.preface = None;
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO: Connected> Connected for Guarded<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preface() -> PrefaceDeadline {
        PrefaceDeadline {
            deadline: Box::pin(tokio::time::sleep(Duration::from_secs(1))),
            read: 0,
            header: [0; 9],
        }
    }

    #[tokio::test]
    async fn the_preface_is_complete_after_the_magic_and_its_settings_frame() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // A SETTINGS frame with two settings (12 bytes of payload).
        bytes.extend([0, 0, 12, 4, 0, 0, 0, 0, 0]);
        bytes.extend([0; 12]);
        let mut whole = preface();
        assert!(whole.read(&bytes));
        // A byte at a time: complete only with the last byte.
        let mut trickled = preface();
        let (last, rest) = bytes.split_last().unwrap();
        for byte in rest {
            assert!(!trickled.read(std::slice::from_ref(byte)));
        }
        assert!(trickled.read(&[*last]));
    }

    #[test]
    fn the_backoff_grows_to_its_bound_and_logs_once() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut backoff = Backoff::default();
            let error = io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32);
            assert!(out_of_descriptors(&error));
            let pauses: Vec<Duration> = (0..10).map(|_| backoff.failed(&error)).collect();
            assert_eq!(pauses[0], FIRST_BACKOFF);
            assert_eq!(*pauses.last().unwrap(), MAX_BACKOFF);
            assert_eq!(backoff.unlogged, 9);
            backoff.succeeded();
            assert_eq!(backoff.failed(&error), FIRST_BACKOFF);
        });
    }
}
