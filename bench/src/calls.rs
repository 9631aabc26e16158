//! The client side of one `AcquireLease` call, as the workers drive it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use gpulease_client::pb::v1 as pb;
use gpulease_client::pb::v1::lease_event::Kind as EventKind;
use gpulease_client::pb::v1::lease_request::Kind as RequestKind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use gpulease_testkit::clock::now_ns;

/// A client on one connection (an HTTP/2 channel); clones share it.
pub(crate) type Client = gpulease_client::Client;

/// How long a server may take to end a stream after `Release`.
const END_TIMEOUT: Duration = Duration::from_secs(5);

/// How many events an ending stream may still carry before its end (an
/// echo server answers the `Release` itself; a broker sends nothing).
const MAX_EVENTS_BEFORE_END: usize = 16;

/// Connects to `address` (`HOST:PORT` or `unix:/PATH`) the way the CLI does.
pub(crate) async fn connect(address: &str) -> Result<Client> {
    Ok(gpulease_client::connect(address).await?)
}

/// A grant as the client saw it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Granted {
    /// The fencing token: with capacity 1, grant `k + 1` follows the end
    /// of lease `k`.
    pub(crate) token: u64,
    /// When the client read the `Granted` event, on the shared clock.
    pub(crate) at_ns: u64,
}

/// An answer from the server on an `AcquireLease` stream.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Answer {
    /// The request waits.
    Queued,
    /// The lease is granted.
    Granted(Granted),
}

/// An open `AcquireLease` call.
#[derive(Debug)]
pub(crate) struct Call {
    requests: mpsc::Sender<pb::LeaseRequest>,
    events: Streaming<pb::LeaseEvent>,
}

impl Call {
    /// Opens a call and sends its `acquire`. Returns once the response
    /// headers arrived, that is once the server has read the `acquire`.
    pub(crate) async fn open(client: &Client, consumer: &str) -> Result<Self> {
        let (requests, outbound) = mpsc::channel(4);
        let acquire = pb::LeaseRequest {
            kind: Some(RequestKind::Acquire(pb::Acquire {
                consumer: consumer.to_owned(),
                client_pid: std::process::id(),
                ..Default::default()
            })),
        };
        requests
            .send(acquire)
            .await
            .context("the request stream closed before it was opened")?;
        let response = client
            .clone()
            .acquire_lease(ReceiverStream::new(outbound))
            .await
            .context("AcquireLease failed")?;
        Ok(Self {
            requests,
            events: response.into_inner(),
        })
    }

    /// The next `Queued` or `Granted` event; any other end is an error.
    pub(crate) async fn answer(&mut self) -> Result<Answer> {
        let event = self
            .events
            .message()
            .await
            .context("the AcquireLease stream failed")?
            .context("the AcquireLease stream ended before a grant")?;
        let at_ns = now_ns();
        match event.kind {
            Some(EventKind::Queued(_)) => Ok(Answer::Queued),
            Some(EventKind::Granted(granted)) => Ok(Answer::Granted(Granted {
                token: granted.fencing_token,
                at_ns,
            })),
            other => bail!("unexpected event {other:?}"),
        }
    }

    /// Waits for the grant, skipping position updates. The caller bounds it
    /// in time.
    pub(crate) async fn granted(&mut self) -> Result<Granted> {
        self.granted_counting(&AtomicU64::new(0)).await
    }

    /// [`Call::granted`], counting the position updates skipped into
    /// `updates` as they arrive.
    pub(crate) async fn granted_counting(&mut self, updates: &AtomicU64) -> Result<Granted> {
        loop {
            match self.answer().await? {
                Answer::Granted(granted) => return Ok(granted),
                Answer::Queued => {
                    updates.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Sends one `Release` and waits for the next `Granted`: a round trip
    /// on an echo server, which answers every message.
    pub(crate) async fn ping(&mut self) -> Result<Granted> {
        self.requests
            .send(release())
            .await
            .context("the request stream closed")?;
        self.granted().await
    }

    /// Sends `Release` and half-closes; the server ends the stream next.
    pub(crate) async fn release(self) -> Ending {
        // A closed request stream means the call already ended; the caller
        // finds out from the events.
        let _ = self.requests.send(release()).await;
        drop(self.requests);
        Ending(self.events)
    }
}

/// A call whose `Release` has been sent.
#[derive(Debug)]
pub(crate) struct Ending(Streaming<pb::LeaseEvent>);

impl Ending {
    /// Waits for the server to end the stream with an OK status, skipping
    /// a few events before the end; at most [`END_TIMEOUT`].
    pub(crate) async fn end(mut self) -> Result<()> {
        let read = async {
            for _ in 0..MAX_EVENTS_BEFORE_END {
                if self.0.message().await?.is_none() {
                    return Ok(());
                }
            }
            bail!("the stream did not end after {MAX_EVENTS_BEFORE_END} events")
        };
        tokio::time::timeout(END_TIMEOUT, read)
            .await
            .context("the stream did not end after Release")?
    }
}

fn release() -> pb::LeaseRequest {
    pb::LeaseRequest {
        kind: Some(RequestKind::Release(pb::Release {})),
    }
}
