//! The fencing tokens' ceiling: a start claims its epoch and a block of
//! tokens in the state file before it serves, and a higher ceiling is
//! written (off the grant path) before tokens above the old one are used.

use std::time::{SystemTime, UNIX_EPOCH};

use super::{Broker, Event, State};
use crate::state::{Persisted, StateError, StateFile, TOKEN_BLOCK};

/// The epoch and tokens a start claimed in the state file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Claim {
    /// This start's epoch.
    pub epoch: u64,
    /// The first token it hands out.
    pub first_token: u64,
    /// The ceiling on disk.
    pub ceiling: u64,
}

impl Broker {
    /// Claims this start's epoch and a block of tokens in `state`, durably,
    /// before anything is served: the epoch is the Unix time in
    /// milliseconds, or one more than the last start's if the clock went
    /// back; tokens start above the last ceiling written. Blocking.
    pub(crate) fn claim(state: &StateFile, previous: Persisted) -> Result<Claim, StateError> {
        // Checked: a ceiling near `u64::MAX` must stop the broker, not wrap
        // around to tokens that were handed out long ago.
        let overflow = |what: &str| StateError::Damaged {
            path: state.path(),
            problem: format!("has no room left for {what}"),
        };
        let next_epoch = previous
            .epoch
            .checked_add(1)
            .ok_or_else(|| overflow("another epoch"))?;
        let epoch = new_epoch().max(next_epoch);
        let first_token = previous
            .token_ceiling
            .checked_add(1)
            .ok_or_else(|| overflow("another token"))?;
        let ceiling = previous
            .token_ceiling
            .checked_add(TOKEN_BLOCK)
            .ok_or_else(|| overflow("another block of tokens"))?;
        state
            .store(Persisted {
                token_ceiling: ceiling,
                epoch,
            })
            .map_err(|source| StateError::Io {
                path: state.path(),
                source,
            })?;
        Ok(Claim {
            epoch,
            first_token,
            ceiling,
        })
    }

    /// Writes a higher token ceiling in the background once fewer than half
    /// a block of tokens is left, and lets the core use it once it is on
    /// disk. Grants wait (they are never made above a ceiling on disk) if
    /// the writing falls behind or fails.
    pub(super) fn ensure_tokens(&self, state: &State, log: &mut Vec<Event>) {
        use std::sync::atomic::Ordering;
        if state.sched.tokens_left() >= TOKEN_BLOCK / 2
            || self.raising_ceiling.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let ceiling = state
            .sched
            .last_token()
            .0
            .checked_add(state.sched.tokens_left())
            .and_then(|ceiling| ceiling.checked_add(TOKEN_BLOCK));
        let Some(ceiling) = ceiling else {
            // Only after about 2^64 grants; grants stop at the ceiling.
            log.push(Event::TokensUsedUp);
            return;
        };
        let persisted = Persisted {
            token_ceiling: ceiling,
            epoch: self.epoch,
        };
        let (file, this) = (self.state_file.clone(), self.this.clone());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.raising_ceiling.store(false, Ordering::Release);
            return;
        };
        runtime.spawn(async move {
            let stored = tokio::task::spawn_blocking(move || file.store(persisted)).await;
            let Some(broker) = this.upgrade() else { return };
            match stored {
                Ok(Ok(())) => broker.update(|sched, _| sched.raise_token_ceiling(ceiling)),
                Ok(Err(e)) => tracing::error!(error = %e, "cannot write the token ceiling; grants stop at the current one"),
                Err(e) => tracing::error!(error = %e, "the token ceiling writer failed"),
            }
            broker.raising_ceiling.store(false, Ordering::Release);
        });
    }
}

fn new_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, super::millis)
}
