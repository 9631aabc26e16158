//! The resource of the lost-update workload: a counter in a file that checks
//! fencing tokens, as a database row or an object store would.
//!
//! Every access presents the holder's token. The file remembers the highest
//! token it has seen, on reads as well as writes, and refuses any access
//! with a lower one. A holder reads the value, works, and writes the value
//! plus one: the read and the write are separate steps, so only mutual
//! exclusion (and, for a holder that froze and lost its lease, the token
//! check) keeps increments from being lost.
//!
//! The file is an append-only log of fixed-size records, each one `write`
//! under an exclusive `flock`; the last record holds the current state, so a
//! process killed at any moment leaves the file consistent, and the whole
//! history of accepted accesses stays behind for the checker.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// The size of one record: `K` + three 20-digit numbers, spaces, newline.
const RECORD: usize = 64;

/// What the counter accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Record {
    /// `b'R'` for a read, `b'W'` for a write.
    pub(crate) kind: u8,
    /// The highest token seen, after this access.
    pub(crate) high_water: u64,
    /// The value, after this access.
    pub(crate) value: u64,
    /// The token presented.
    pub(crate) token: u64,
}

/// The counter file.
#[derive(Clone, Debug)]
pub(crate) struct Counter {
    path: PathBuf,
}

impl Counter {
    /// Creates an empty counter (value 0, no token seen) at `path`.
    pub(crate) fn create(path: &Path) -> io::Result<Self> {
        File::create(path)?;
        Ok(Self::open(path))
    }

    /// The counter at `path`.
    pub(crate) fn open(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }

    /// Reads the value with `token`; `None` when a higher token was seen.
    pub(crate) fn read(&self, token: u64) -> io::Result<Option<u64>> {
        let file = self.lock()?;
        let last = last(&file)?;
        if token < last.high_water {
            return Ok(None);
        }
        append(
            &file,
            Record {
                kind: b'R',
                high_water: token,
                value: last.value,
                token,
            },
        )?;
        Ok(Some(last.value))
    }

    /// Writes `value` with `token`; `false` when a higher token was seen.
    /// The counter does not compare values: a write based on a stale read
    /// is accepted, which is what makes a lost update visible.
    pub(crate) fn write(&self, token: u64, value: u64) -> io::Result<bool> {
        let file = self.lock()?;
        let last = last(&file)?;
        if token < last.high_water {
            return Ok(false);
        }
        append(
            &file,
            Record {
                kind: b'W',
                high_water: token,
                value,
                token,
            },
        )?;
        Ok(true)
    }

    /// Every accepted access, in order.
    pub(crate) fn records(&self) -> io::Result<Vec<Record>> {
        let bytes = std::fs::read(&self.path)?;
        Ok(bytes.chunks_exact(RECORD).filter_map(parse).collect())
    }

    fn lock(&self) -> io::Result<Flock<File>> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&self.path)?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| io::Error::from(errno))
    }
}

fn last(file: &File) -> io::Result<Record> {
    let len = file.metadata()?.len();
    if len < RECORD as u64 {
        return Ok(Record::default());
    }
    let mut bytes = [0u8; RECORD];
    file.read_exact_at(&mut bytes, len - (len % RECORD as u64) - RECORD as u64)?;
    parse(&bytes).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "a bad counter record"))
}

fn append(mut file: &File, record: Record) -> io::Result<()> {
    let line = format!(
        "{}{:020} {:020} {:020}\n",
        record.kind as char, record.high_water, record.value, record.token
    );
    debug_assert_eq!(line.len(), RECORD);
    // One write: a process killed here leaves a whole record or none.
    file.write_all(line.as_bytes())
}

fn parse(bytes: &[u8]) -> Option<Record> {
    let text = std::str::from_utf8(bytes).ok()?;
    let kind = *bytes.first()?;
    let mut numbers = text[1..].split_whitespace().map(str::parse::<u64>);
    Some(Record {
        kind,
        high_water: numbers.next()?.ok()?,
        value: numbers.next()?.ok()?,
        token: numbers.next()?.ok()?,
    })
}
