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
use std::time::{SystemTime, UNIX_EPOCH};

/// How many tokens one persisted ceiling reserves.
pub(crate) const TOKEN_BLOCK: u64 = 10_000;

const FILE_NAME: &str = "state";

/// What the state file holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Persisted {
    /// No token at or below this was handed out by a later start; the next
    /// start hands out tokens above it.
    pub token_ceiling: u64,
    /// The epoch of the start that wrote it.
    pub epoch: u64,
}

/// The state file in a state directory.
#[derive(Debug, Clone)]
pub(crate) struct StateFile {
    dir: PathBuf,
}

/// Why the state file cannot be trusted (or used at all).
#[derive(Debug, thiserror::Error)]
pub(crate) enum StateError {
    /// The directory or the file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file exists but is not whole: handing out tokens from it could
    /// repeat earlier ones.
    #[error("the state file {path} {problem}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
}

impl StateFile {
    /// Opens the state in `dir` (created if missing) and reads it; a missing
    /// file reads as zeros (a first start). A file that exists but is not
    /// whole (empty, truncated, a key missing, a number that does not parse
    /// or leaves no room for another block of tokens) is an error: better to
    /// stop than to hand out old tokens again.
    pub(crate) fn open(dir: &Path) -> Result<(Self, Persisted), StateError> {
        let file = Self::create_dir(dir)?;
        let persisted = match fs::read(file.path()) {
            Ok(bytes) => parse(&bytes).map_err(|problem| StateError::Damaged {
                path: file.path(),
                problem,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Persisted::default(),
            Err(source) => {
                return Err(StateError::Io {
                    path: file.path(),
                    source,
                });
            }
        };
        Ok((file, persisted))
    }

    /// `gpulease serve --reset-state`: the recovery from a damaged or lost
    /// state file. Returns a state whose ceiling is at least the wall
    /// clock's microseconds since 1970 (and at least any ceiling still
    /// legible in the old file), so that the tokens handed out next are
    /// above every token handed out before, on the assumption stated in
    /// RELIABILITY.md: the clock has not been set back, and the old state
    /// never handed out more tokens than microseconds have passed since it
    /// began (at 0 or at an earlier reset's floor). The file is rewritten
    /// by the claim that follows.
    pub(crate) fn reset(dir: &Path, now: SystemTime) -> Result<(Self, Persisted), StateError> {
        let file = Self::create_dir(dir)?;
        let legible = fs::read(file.path())
            .map(|bytes| salvage(&bytes))
            .unwrap_or_default();
        let floor = now.duration_since(UNIX_EPOCH).map_or(0, |since| {
            u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
        });
        let persisted = Persisted {
            token_ceiling: floor.max(legible.token_ceiling),
            epoch: legible.epoch,
        };
        if persisted.token_ceiling > MAX_CEILING {
            return Err(StateError::Damaged {
                path: file.path(),
                problem: format!(
                    "cannot be reset: its ceiling {} leaves no room for more tokens",
                    persisted.token_ceiling
                ),
            });
        }
        Ok((file, persisted))
    }

    fn create_dir(dir: &Path) -> Result<Self, StateError> {
        fs::create_dir_all(dir).map_err(|source| StateError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The file's path.
    pub(crate) fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// Writes `state` atomically and durably: a temporary file, synced,
    /// renamed over the old one, and the directory synced. Blocking.
    pub(crate) fn store(&self, state: Persisted) -> io::Result<()> {
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

/// The highest ceiling a state file may hold: one more block of tokens
/// (and the epoch after it) must still fit in a `u64`.
pub(crate) const MAX_CEILING: u64 = u64::MAX - 2 * TOKEN_BLOCK;

/// Reads a whole state file: both keys, once each, every line complete.
fn parse(bytes: &[u8]) -> Result<Persisted, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err("is empty".to_owned());
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "is not text".to_owned())?;
    if !text.ends_with('\n') {
        return Err("is truncated: its last line is incomplete".to_owned());
    }
    let (mut ceiling, mut epoch) = (None, None);
    for (number, line) in text.lines().enumerate().map(|(n, l)| (n + 1, l.trim())) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once(' ')
            .ok_or_else(|| format!("line {number} is not `KEY NUMBER`: {line:?}"))?;
        let value: u64 = value
            .trim()
            .parse()
            .map_err(|_| format!("line {number}: {:?} is not a number", value.trim()))?;
        let slot = match key {
            "token_ceiling" => &mut ceiling,
            "epoch" => &mut epoch,
            _ => return Err(format!("line {number}: unknown key {key:?}")),
        };
        if slot.replace(value).is_some() {
            return Err(format!("line {number}: `{key}` appears twice"));
        }
    }
    let ceiling = ceiling.ok_or_else(|| "has no `token_ceiling` line".to_owned())?;
    let epoch = epoch.ok_or_else(|| "has no `epoch` line".to_owned())?;
    if ceiling > MAX_CEILING {
        return Err(format!(
            "has token_ceiling {ceiling}, which leaves no room for another block of {TOKEN_BLOCK} tokens below {}",
            u64::MAX
        ));
    }
    if epoch == u64::MAX {
        return Err(format!("has epoch {epoch}, which has no successor"));
    }
    Ok(Persisted {
        token_ceiling: ceiling,
        epoch,
    })
}

/// Whatever numbers a damaged file still shows, for `--reset-state`: the
/// highest of each key found.
fn salvage(bytes: &[u8]) -> Persisted {
    let text = String::from_utf8_lossy(bytes);
    let mut state = Persisted::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(key), Some(value)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(value) = value.parse::<u64>() else {
            continue;
        };
        match key {
            "token_ceiling" => state.token_ceiling = state.token_ceiling.max(value),
            "epoch" => state.epoch = state.epoch.max(value),
            _ => {}
        }
    }
    state
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
    fn a_file_that_is_not_whole_is_an_error_naming_the_problem() {
        for (text, problem) in [
            ("", "is empty"),
            ("\n  \n", "is empty"),
            ("# only a comment\n", "no `token_ceiling`"),
            ("token_ceiling 20000\n", "no `epoch`"),
            ("epoch 7\n", "no `token_ceiling`"),
            ("token_ceiling 20000\nepoch 7", "truncated"),
            ("token_ceiling lots\nepoch 7\n", "\"lots\" is not a number"),
            ("token_ceiling 1\ntoken_ceiling 2\nepoch 7\n", "twice"),
            ("token_ceiling 1\nepoch 7\ncolour 3\n", "unknown key"),
            (
                &format!("token_ceiling {}\nepoch 7\n", u64::MAX - 5),
                "no room for another block",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join(FILE_NAME), text).unwrap();
            let error = StateFile::open(dir.path()).unwrap_err().to_string();
            assert!(
                error.contains(problem) && error.contains(&*dir.path().to_string_lossy()),
                "{text:?}: {error}"
            );
        }
    }

    #[test]
    fn a_reset_starts_above_the_clock_and_anything_legible() {
        let dir = tempfile::tempdir().unwrap();
        let now = UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        fs::write(dir.path().join(FILE_NAME), "token_ceiling 12\nepo").unwrap();
        let (_, reset) = StateFile::reset(dir.path(), now).unwrap();
        assert_eq!(reset.token_ceiling, 1_800_000_000_000_000);
        let high = 1_900_000_000_000_000u64;
        fs::write(
            dir.path().join(FILE_NAME),
            format!("token_ceiling {high}\nepoch 5\n"),
        )
        .unwrap();
        let (_, reset) = StateFile::reset(dir.path(), now).unwrap();
        assert_eq!((reset.token_ceiling, reset.epoch), (high, 5));
    }
}
