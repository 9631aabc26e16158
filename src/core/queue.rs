//! One GPU's waiting requests, in the order they are served: by effective
//! priority, then by arrival.
//!
//! A waiter's effective priority is its priority plus one for every whole
//! `aging` it has waited, so the order changes as time passes and cannot be
//! kept in one sorted map. It can be kept in one map per priority level,
//! though: within a level everyone has the same base, so the oldest has the
//! highest effective priority and the level stays in arrival order. The
//! queue is the merge of its levels, and its head is the best of the levels'
//! oldest waiters. Finding the head costs O(levels · log n), never O(n); the
//! levels are the distinct priorities in use, a handful in practice and at
//! most `MAX_PRIORITY - MIN_PRIORITY + 1` even for a hostile client.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap};
use std::ops::Bound;
use std::time::{Duration, Instant};

use super::{Request, WaiterId};

/// The highest priority a consumer may be configured with.
pub(crate) const MAX_PRIORITY: i32 = 1000;

/// The lowest priority a consumer or a request may have; lower ones are
/// raised to it, so that the number of priority levels stays bounded.
pub(crate) const MIN_PRIORITY: i32 = -1000;

/// A waiting request.
#[derive(Debug)]
pub(super) struct Waiting<W> {
    pub(super) request: Request,
    /// Its priority before aging: its consumer's, or lower if it asked.
    pub(super) priority: i32,
    pub(super) since: Instant,
    pub(super) payload: W,
}

/// A queue key: higher priority first, then earlier arrival.
type Key = (Reverse<i32>, WaiterId);

/// The waiting requests of one GPU.
#[derive(Debug)]
pub(super) struct Queue<W> {
    waiting: BTreeMap<Key, Waiting<W>>,
    /// Each waiter's priority, by id: to find a waiter's key, and the
    /// oldest waiter of all (the first id).
    priority_of: BTreeMap<WaiterId, i32>,
    /// How many wait at each priority.
    levels: BTreeMap<Reverse<i32>, usize>,
    /// Every how long a waiter's effective priority rises by one; zero for
    /// never.
    aging: Duration,
}

impl<W> Queue<W> {
    pub(super) fn new(aging: Duration) -> Self {
        Self {
            waiting: BTreeMap::new(),
            priority_of: BTreeMap::new(),
            levels: BTreeMap::new(),
            aging,
        }
    }

    /// Changes how fast waiters age; the order within each level stays.
    pub(super) fn set_aging(&mut self, aging: Duration) {
        self.aging = aging;
    }

    pub(super) fn len(&self) -> usize {
        self.waiting.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    pub(super) fn contains(&self, id: WaiterId) -> bool {
        self.priority_of.contains_key(&id)
    }

    /// Every waiter's id, in arrival order.
    pub(super) fn ids(&self) -> impl Iterator<Item = WaiterId> + '_ {
        self.priority_of.keys().copied()
    }

    /// When the oldest waiter arrived.
    pub(super) fn oldest_since(&self) -> Option<Instant> {
        let (id, _) = self.priority_of.first_key_value()?;
        self.get(*id).map(|w| w.since)
    }

    pub(super) fn insert(&mut self, id: WaiterId, waiting: Waiting<W>) {
        let priority = waiting.priority;
        self.priority_of.insert(id, priority);
        *self.levels.entry(Reverse(priority)).or_default() += 1;
        self.waiting.insert((Reverse(priority), id), waiting);
    }

    pub(super) fn remove(&mut self, id: WaiterId) -> Option<Waiting<W>> {
        let priority = self.priority_of.remove(&id)?;
        if let Some(count) = self.levels.get_mut(&Reverse(priority)) {
            *count -= 1;
            if *count == 0 {
                self.levels.remove(&Reverse(priority));
            }
        }
        self.waiting.remove(&(Reverse(priority), id))
    }

    pub(super) fn get(&self, id: WaiterId) -> Option<&Waiting<W>> {
        let priority = self.priority_of.get(&id)?;
        self.waiting.get(&(Reverse(*priority), id))
    }

    pub(super) fn get_mut(&mut self, id: WaiterId) -> Option<&mut Waiting<W>> {
        let priority = self.priority_of.get(&id)?;
        self.waiting.get_mut(&(Reverse(*priority), id))
    }

    /// A waiter's effective priority at `now`.
    pub(super) fn effective(&self, waiting: &Waiting<W>, now: Instant) -> i32 {
        effective(waiting.priority, waiting.since, now, self.aging)
    }

    /// The waiter served next, at `now`.
    pub(super) fn head(&self, now: Instant) -> Option<WaiterId> {
        if self.aging.is_zero() {
            return self.waiting.keys().next().map(|(_, id)| *id);
        }
        // Nobody gained more from aging than the oldest waiter of all, so a
        // level whose base plus that gain is below the best so far can hold
        // no better waiter, and neither can any lower level.
        let oldest = self.priority_of.first_key_value()?;
        let oldest = self.get(*oldest.0)?;
        let most_gained = i64::from(self.effective(oldest, now)) - i64::from(oldest.priority);
        let mut best: Option<(i32, WaiterId)> = None;
        for Reverse(level) in self.levels.keys() {
            if let Some((best_priority, _)) = best
                && i64::from(*level) + most_gained < i64::from(best_priority)
            {
                break;
            }
            let Some((&(_, id), waiting)) = self.first_of(*level) else {
                continue;
            };
            let priority = self.effective(waiting, now);
            if best.is_none_or(|b| before((priority, id), b)) {
                best = Some((priority, id));
            }
        }
        best.map(|(_, id)| id)
    }

    /// The waiters in the order they are served at `now`, each with its
    /// effective priority. Lazy: taking the first k costs O(k · log levels)
    /// after O(levels · log n) to start.
    pub(super) fn in_order(&self, now: Instant) -> InOrder<'_, W> {
        let mut heads = BinaryHeap::new();
        for Reverse(level) in self.levels.keys() {
            let from = (Reverse(*level), WaiterId(0));
            let to = (Reverse(*level), WaiterId(u64::MAX));
            let mut entries = self.waiting.range(from..=to);
            if let Some((&(_, id), waiting)) = entries.next() {
                heads.push(Cursor {
                    priority: self.effective(waiting, now),
                    id,
                    waiting,
                    rest: entries,
                });
            }
        }
        InOrder {
            queue: self,
            now,
            heads,
        }
    }

    /// How many waiters would be served before a request of `priority`
    /// arriving at `now`: every one whose effective priority is at least
    /// that (ties go to the earlier arrival). O(levels) plus the waiters of
    /// lower levels that aged past it.
    pub(super) fn ahead_of_newcomer(&self, priority: i32, now: Instant) -> usize {
        let mut ahead = 0;
        for (Reverse(level), count) in &self.levels {
            if *level >= priority {
                ahead += count;
                continue;
            }
            if self.aging.is_zero() {
                break;
            }
            let from = (Reverse(*level), WaiterId(0));
            let to = (Reverse(*level), WaiterId(u64::MAX));
            ahead += self
                .waiting
                .range(from..=to)
                .take_while(|(_, w)| self.effective(w, now) >= priority)
                .count();
        }
        ahead
    }

    fn first_of(&self, level: i32) -> Option<(&Key, &Waiting<W>)> {
        let from = (Reverse(level), WaiterId(0));
        self.waiting
            .range((Bound::Included(from), Bound::Unbounded))
            .next()
            .filter(|((Reverse(p), _), _)| *p == level)
    }
}

/// Whether a waiter with `a` (effective priority, id) is served before one
/// with `b`: higher effective priority first, then earlier arrival.
fn before(a: (i32, WaiterId), b: (i32, WaiterId)) -> bool {
    a.0 > b.0 || (a.0 == b.0 && a.1 < b.1)
}

/// `priority` plus one for every whole `aging` waited since `since`.
pub(super) fn effective(priority: i32, since: Instant, now: Instant, aging: Duration) -> i32 {
    if aging.is_zero() {
        return priority;
    }
    let waited = now.saturating_duration_since(since).as_nanos();
    let gained = waited / aging.as_nanos().max(1);
    let gained = i32::try_from(gained).unwrap_or(i32::MAX);
    priority.saturating_add(gained)
}

/// The queue in serving order; see [`Queue::in_order`].
pub(super) struct InOrder<'a, W> {
    queue: &'a Queue<W>,
    now: Instant,
    heads: BinaryHeap<Cursor<'a, W>>,
}

struct Cursor<'a, W> {
    priority: i32,
    id: WaiterId,
    waiting: &'a Waiting<W>,
    rest: std::collections::btree_map::Range<'a, Key, Waiting<W>>,
}

impl<W> PartialEq for Cursor<'_, W> {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl<W> Eq for Cursor<'_, W> {}

impl<W> PartialOrd for Cursor<'_, W> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<W> Ord for Cursor<'_, W> {
    /// The greatest is served first (the heap pops the greatest).
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority
            .cmp(&other.priority)
            .then_with(|| other.id.cmp(&self.id))
    }
}

impl<'a, W> Iterator for InOrder<'a, W> {
    type Item = (WaiterId, i32, &'a Waiting<W>);

    fn next(&mut self) -> Option<Self::Item> {
        let mut cursor = self.heads.pop()?;
        let item = (cursor.id, cursor.priority, cursor.waiting);
        if let Some((&(_, id), waiting)) = cursor.rest.next() {
            cursor.priority = self.queue.effective(waiting, self.now);
            cursor.id = id;
            cursor.waiting = waiting;
            self.heads.push(cursor);
        }
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(aging_ms: u64, waiters: &[(i32, u64)], start: Instant) -> Queue<()> {
        let mut queue = Queue::new(Duration::from_millis(aging_ms));
        for (n, (priority, at_ms)) in waiters.iter().enumerate() {
            queue.insert(
                WaiterId(n as u64 + 1),
                Waiting {
                    request: Request::default(),
                    priority: *priority,
                    since: start + Duration::from_millis(*at_ms),
                    payload: (),
                },
            );
        }
        queue
    }

    fn order(queue: &Queue<()>, now: Instant) -> Vec<(u64, i32)> {
        queue.in_order(now).map(|(id, p, _)| (id.0, p)).collect()
    }

    #[test]
    fn without_aging_higher_priority_first_then_arrival() {
        let t0 = Instant::now();
        let q = queue(0, &[(0, 0), (5, 1), (0, 2), (5, 3)], t0);
        let now = t0 + Duration::from_secs(3600);
        assert_eq!(order(&q, now), [(2, 5), (4, 5), (1, 0), (3, 0)]);
        assert_eq!(q.head(now), Some(WaiterId(2)));
        assert_eq!(q.ahead_of_newcomer(5, now), 2);
        assert_eq!(q.ahead_of_newcomer(1, now), 2);
        assert_eq!(q.ahead_of_newcomer(0, now), 4);
    }

    #[test]
    fn aging_raises_the_old_and_ties_go_to_the_earlier_arrival() {
        let t0 = Instant::now();
        // Waiter 1 (priority 0) arrived at 0; waiters 2 and 3 (priority 2) at
        // 1 s and 2.5 s; aging is 1 s.
        let q = queue(1000, &[(0, 0), (2, 1000), (2, 2500)], t0);
        let at = |ms| t0 + Duration::from_millis(ms);
        // At 2.5 s waiters 1 and 3 both have 2: the earlier arrival first.
        assert_eq!(order(&q, at(2500)), [(2, 3), (1, 2), (3, 2)]);
        // At 3 s, waiter 1 has 3, waiter 2 has 4, waiter 3 has 2.
        assert_eq!(order(&q, at(3000)), [(2, 4), (1, 3), (3, 2)]);
        assert_eq!(q.head(at(3000)), Some(WaiterId(2)));
        // At 4 s, waiter 1 has 4, waiter 2 has 5, waiter 3 has 3.
        assert_eq!(order(&q, at(4000)), [(2, 5), (1, 4), (3, 3)]);
        let q = queue(1000, &[(0, 0), (2, 2000)], t0);
        // At 2 s both have 2: the earlier arrival first.
        assert_eq!(order(&q, at(2000)), [(1, 2), (2, 2)]);
        assert_eq!(q.head(at(2000)), Some(WaiterId(1)));
        assert_eq!(q.ahead_of_newcomer(2, at(2000)), 2);
        assert_eq!(q.ahead_of_newcomer(3, at(2000)), 0);
    }

    #[test]
    fn removal_keeps_the_levels_right() {
        let t0 = Instant::now();
        let mut q = queue(0, &[(1, 0), (1, 1), (0, 2)], t0);
        assert!(q.remove(WaiterId(1)).is_some());
        assert!(q.remove(WaiterId(1)).is_none());
        assert!(q.remove(WaiterId(2)).is_some());
        assert_eq!(q.head(t0), Some(WaiterId(3)));
        assert_eq!(q.len(), 1);
        assert!(q.levels.len() == 1 && q.contains(WaiterId(3)));
    }
}
