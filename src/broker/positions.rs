//! Where each waiter stands: its first position comes with its ticket, and
//! a periodic sweep tells it when its position improves, so that a grant
//! sends no position message at all (the core finds it in
//! O(levels · log n)), and a waiter hears O(log n) updates while a queue of
//! n drains.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Broker;
use crate::core::HolderView;

/// How often waiters are told about a better position, at most. Updates
/// come from a periodic sweep rather than from every grant, so that no
/// grant visits the waiters behind it.
pub(crate) const POSITION_UPDATE_INTERVAL: Duration = Duration::from_millis(250);

/// Where a waiting request stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct QueuePosition {
    /// Its place; 1 is next.
    pub position: u32,
    /// How many requests wait for the same GPU.
    pub queue_depth: u32,
    /// The GPU it waits for.
    pub gpu_index: u32,
    /// Who holds that GPU.
    pub holders: Arc<[HolderView]>,
    /// Why the head of the queue is not granted although a permit is free.
    pub blocked_by: Option<String>,
    /// The request's effective priority now.
    pub priority: i32,
    /// How much longer it is expected to wait; `None` when unknown.
    pub estimated_wait: Option<Duration>,
}

impl QueuePosition {
    /// Where a request stands before anything is known.
    pub(super) fn unknown() -> Self {
        Self {
            position: u32::MAX,
            queue_depth: 0,
            gpu_index: 0,
            holders: Arc::from([]),
            blocked_by: None,
            priority: 0,
            estimated_wait: None,
        }
    }
}

impl Broker {
    /// Tells waiters whose position improved (or whose reason for waiting
    /// changed): the first [`NEAR_SWEEP`] of each queue every tick, the rest
    /// every [`FULL_SWEEP_EVERY`] ticks; every
    /// [`POSITION_UPDATE_INTERVAL`] at most, until shutdown.
    pub(super) async fn sweep_positions(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(POSITION_UPDATE_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Whether the queue moved since the last sweep of every waiter.
        let mut far_moved = false;
        for tick in 1u64.. {
            tokio::select! {
                _ = ticks.tick() => {}
                () = self.shutdown.cancelled() => return,
            }
            let mut state = self.lock();
            let moved = std::mem::take(&mut state.queue_moved);
            far_moved |= moved;
            // Near the head every tick; everyone only every few ticks, so
            // that a long queue costs the lock (and its waiters messages)
            // in proportion to its head, not its length.
            let everyone = far_moved && tick % FULL_SWEEP_EVERY == 0;
            if !moved && !everyone {
                continue;
            }
            if everyone {
                far_moved = false;
            }
            let limit = (!everyone).then_some(NEAR_SWEEP);
            let now = Instant::now().into_std();
            let gpus: Vec<u32> = state.sched.gpus().map(|gpu| gpu.index).collect();
            let holders: Vec<Arc<[HolderView]>> = gpus
                .iter()
                .map(|index| state.sched.holders(Some(*index), now).into())
                .collect();
            state.sched.for_each_waiter(limit, now, |place, seat| {
                // Only the head's reason matters to it; the others wait
                // behind the head whatever the reason.
                let blocked_by = place
                    .blocked
                    .filter(|_| place.position == 1)
                    .map(ToString::to_string);
                seat.position.send_if_modified(|current| {
                    let changed = worth_telling(place.position, current.position)
                        || (place.position == current.position && blocked_by != current.blocked_by);
                    if changed {
                        let slot = gpus.iter().position(|index| *index == place.gpu_index);
                        *current = QueuePosition {
                            position: place.position,
                            queue_depth: place.queue_depth,
                            gpu_index: place.gpu_index,
                            holders: slot
                                .map_or_else(|| Arc::from([]), |s| Arc::clone(&holders[s])),
                            blocked_by,
                            priority: place.priority,
                            estimated_wait: place.estimated_wait,
                        };
                    }
                    changed
                });
            });
        }
    }
}

/// Whether a waiter told `told` should hear that it is now at `position`:
/// always near the head, and further back only once the position has
/// improved by a tenth. A waiter then hears O(log n) updates while a queue
/// of n drains, so a grant costs O(log n) messages amortised, not O(n).
fn worth_telling(position: u32, told: u32) -> bool {
    position < told && (position <= NEAR_HEAD || u64::from(position) * 10 <= u64::from(told) * 9)
}

/// Waiters this close to the head hear every improvement.
const NEAR_HEAD: u32 = 16;

/// How many waiters per GPU the sweep visits on every tick.
pub(super) const NEAR_SWEEP: usize = 64;

/// Every how many ticks the sweep visits every waiter.
const FULL_SWEEP_EVERY: u64 = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_draining_queue_tells_each_waiter_a_few_times() {
        assert!(worth_telling(16, 17) && worth_telling(1, 2));
        assert!(!worth_telling(990, 1000) && worth_telling(900, 1000));
        assert!(!worth_telling(5, 5) && !worth_telling(6, 5));
        // The last of 10,000 waiters, as the queue drains one by one.
        let (mut told, mut updates) = (10_000, 0);
        for position in (1..10_000).rev() {
            if worth_telling(position, told) {
                told = position;
                updates += 1;
            }
        }
        assert_eq!(told, 1);
        assert!(updates < 16 + 70, "{updates} updates");
    }
}
