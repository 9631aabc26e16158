//! The broker's log writer: a bounded queue in front of stderr, drained by a
//! thread of its own, so that a slow, full or closed stderr (a pipe whose
//! reader went away, a stalled journal) never blocks or fails the code that
//! logs. Lines that cannot be queued or written are dropped and counted
//! ([`lines_dropped`], shown in Status as `BrokerInfo.log_lines_dropped`).
//!
//! Nothing here panics on an I/O error: `eprintln!` would, and a panic on
//! the grant path once left a permit held for no one.

use std::io::Write as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How many lines may wait for stderr before new ones are dropped.
const QUEUE_LINES: usize = 4096;

static DROPPED: AtomicU64 = AtomicU64::new(0);
static QUEUE: OnceLock<SyncSender<Message>> = OnceLock::new();

enum Message {
    Line(Vec<u8>),
    /// Answered once every line queued before it was written (or dropped).
    Flush(mpsc::Sender<()>),
}

/// How many log lines were dropped since the start: the queue was full
/// (stderr blocked) or writing failed (stderr closed).
pub(crate) fn lines_dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The writer to give `tracing_subscriber::fmt().with_writer`: it queues
/// each line and returns at once. The first call starts the writer thread.
pub(crate) fn writer() -> LogQueue {
    LogQueue {
        queue: queue().cloned(),
    }
}

/// Writes `text` (one line, or a few) through the queue: for messages that
/// are not tracing events, such as `gpulease: invalid configuration`.
pub(crate) fn say(text: &str) {
    let mut line = text.as_bytes().to_vec();
    if !line.ends_with(b"\n") {
        line.push(b'\n');
    }
    send(queue(), line);
}

/// Waits up to `timeout` for the lines queued so far to be written: before
/// the process exits, or aborts after a panic.
pub(crate) fn flush(timeout: Duration) {
    let Some(queue) = QUEUE.get() else { return };
    let (done, wait) = mpsc::channel();
    if queue.try_send(Message::Flush(done)).is_ok() {
        let _ = wait.recv_timeout(timeout);
    }
}

/// A [`MakeWriter`] that queues lines for the writer thread.
#[derive(Clone, Debug)]
pub(crate) struct LogQueue {
    queue: Option<SyncSender<Message>>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Message")
    }
}

impl<'a> MakeWriter<'a> for LogQueue {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            queue: self.queue.as_ref(),
            line: Vec::new(),
        }
    }
}

/// One event's text, queued as a whole when dropped.
#[derive(Debug)]
pub(crate) struct LineWriter<'a> {
    queue: Option<&'a SyncSender<Message>>,
    line: Vec<u8>,
}

impl std::io::Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter<'_> {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            send(self.queue, std::mem::take(&mut self.line));
        }
    }
}

/// Counts one dropped line, for Status and for the metrics
/// (`gpulease_log_lines_dropped_total`).
fn dropped() {
    DROPPED.fetch_add(1, Ordering::Relaxed);
    crate::metrics::log_line_dropped();
}

fn send(queue: Option<&SyncSender<Message>>, line: Vec<u8>) {
    let Some(queue) = queue else {
        // No writer thread could be started: write directly, never panic.
        if std::io::stderr().write_all(&line).is_err() {
            dropped();
        }
        return;
    };
    match queue.try_send(Message::Line(line)) {
        Ok(()) => {}
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            dropped();
        }
    }
}

fn queue() -> Option<&'static SyncSender<Message>> {
    if let Some(queue) = QUEUE.get() {
        return Some(queue);
    }
    let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
    let started = std::thread::Builder::new()
        .name("gpulease-log".to_owned())
        .spawn(move || drain(rx));
    match started {
        // Another thread may have won the race; its queue is the one.
        Ok(_) => Some(QUEUE.get_or_init(|| tx)),
        Err(_) => None,
    }
}

/// The writer thread: writes each line to stderr; a line that fails (stderr
/// closed) is counted and the next one tried, so that a reader that comes
/// back (a restarted journal) gets lines again.
fn drain(lines: Receiver<Message>) {
    let mut stderr = std::io::stderr();
    for message in lines {
        match message {
            Message::Line(line) => {
                if stderr.write_all(&line).is_err() {
                    dropped();
                }
            }
            Message::Flush(done) => {
                let _ = stderr.flush();
                let _ = done.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_queued_whole_and_flushed() {
        let queue = writer();
        let mut line = queue.make_writer();
        line.write_all(b"gpulease: ").unwrap();
        line.write_all(b"a log line from a unit test\n").unwrap();
        drop(line);
        flush(Duration::from_secs(5));
    }
}
