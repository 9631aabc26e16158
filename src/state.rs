//! The broker's state file: the fencing-token ceiling and the epoch, so
//! that tokens strictly increase across restarts, `kill -9` included.
//!
//! Tokens are reserved in blocks: the broker writes a ceiling to disk
//! (atomically, and synced) before it hands out any token below it, and
//! raises it in the background well before it is reached. After a restart
//! it starts above the last ceiling written, so a token is never handed out
//! twice, whatever happened to the process; at most one block of numbers is
//! skipped.

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

/// How many tokens one persisted ceiling reserves.
pub const TOKEN_BLOCK: u64 = 10_000;

const FILE_NAME: &str = "state";

/// What the state file holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Persisted {
    /// No token at or below this was handed out by a later start; the next
    /// start hands out tokens above it.
    pub token_ceiling: u64,
    /// The epoch of the start that wrote it.
    pub epoch: u64,
}

/// The state file in a state directory.
#[derive(Debug, Clone)]
pub struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    /// Opens the state in `dir` (created if missing) and reads it; a missing
    /// file reads as zeros. A file that cannot be parsed is an error: better
    /// to stop than to hand out old tokens again.
    pub fn open(dir: &Path) -> io::Result<(Self, Persisted)> {
        fs::create_dir_all(dir)?;
        let file = Self {
            dir: dir.to_path_buf(),
        };
        let persisted = match fs::read_to_string(file.path()) {
            Ok(text) => parse(&text).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not a gpulease state file", file.path().display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Persisted::default(),
            Err(e) => return Err(e),
        };
        Ok((file, persisted))
    }

    /// The file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// Writes `state` atomically and durably: a temporary file, synced,
    /// renamed over the old one, and the directory synced. Blocking.
    pub fn store(&self, state: Persisted) -> io::Result<()> {
        let temporary = self.dir.join(format!("{FILE_NAME}.tmp"));
        let mut file = File::create(&temporary)?;
        write!(
            file,
            "# gpulease state; do not edit while the broker runs.\n\
             token_ceiling {}\nepoch {}\n",
            state.token_ceiling, state.epoch
        )?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temporary, self.path())?;
        File::open(&self.dir)?.sync_all()
    }
}

fn parse(text: &str) -> Option<Persisted> {
    let mut state = Persisted::default();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once(' ')?;
        let value: u64 = value.trim().parse().ok()?;
        match key {
            "token_ceiling" => state.token_ceiling = value,
            "epoch" => state.epoch = value,
            _ => {}
        }
    }
    Some(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("nested/state");
        let (file, first) = StateFile::open(&state_dir).unwrap();
        assert_eq!(first, Persisted::default());
        let state = Persisted {
            token_ceiling: 20_000,
            epoch: 1_795_911_422_166,
        };
        file.store(state).unwrap();
        file.store(state).unwrap();
        let (_, again) = StateFile::open(&state_dir).unwrap();
        assert_eq!(again, state);
        assert!(!state_dir.join("state.tmp").exists());
    }

    #[test]
    fn a_damaged_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE_NAME), "token_ceiling lots\n").unwrap();
        let error = StateFile::open(dir.path()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }
}
