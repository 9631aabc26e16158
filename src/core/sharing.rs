//! The rules that let a request go before the head of its queue, and
//! those that make a holder go: backfill with the head's reservation, and
//! preemption with its grace.

use std::time::Instant;

use super::*;

impl<W, H: Clone + Default> Scheduler<W, H> {
    /// The reservation rule. Backfill may delay the head only by the
    /// backfilled leases' own durations: once the head would fit (memory
    /// and permit) if the leases backfilled ahead of it ended, it holds the
    /// GPU's reservation and nothing more is granted before it. Returns
    /// whether the head holds it. A head that no lease overtook holds
    /// none: it waits for holders granted in their turn.
    pub(super) fn note_reservation(&mut self, slot: usize, head: WaiterId) -> bool {
        let capacity = self.settings.capacity;
        let margin = self.settings.safety_margin_mib;
        let gpu = &mut self.gpus[slot];
        let reserved = self.settings.backfill && {
            let waiting = gpu.waiting.get(head).expect("the head waits");
            let backfilled: Vec<&Holding<H>> = gpu
                .holding
                .values()
                .filter(|h| h.overtook(head, waiting.priority))
                .collect();
            let request = &waiting.request;
            let permit = gpu.holding.len() - backfilled.len() < capacity;
            let freed: u64 = backfilled.iter().map(|h| gpu.holder_mib(h)).sum();
            let memory = request.vram_mib == 0
                || gpu.headroom(&request.consumer, margin) + i128::from(freed)
                    >= i128::from(request.vram_mib);
            !backfilled.is_empty() && permit && memory
        };
        gpu.reserved = reserved.then_some(head);
        reserved
    }

    /// The first waiter behind `head`, within [`BACKFILL_WINDOW`], that fits
    /// now without anyone unloading. Residents asked to unload for the head
    /// are not granted ahead of it.
    pub(super) fn backfill_candidate(
        &self,
        slot: usize,
        head: WaiterId,
        now: Instant,
    ) -> Option<WaiterId> {
        let gpu = &self.gpus[slot];
        let margin = self.settings.safety_margin_mib;
        let victims: &[String] = gpu.admission.as_ref().map_or(&[], |a| a.victims.as_slice());
        gpu.waiting
            .in_order(now)
            .filter(|(id, _, _)| *id != head)
            .take(BACKFILL_WINDOW)
            .find(|(_, _, waiting)| {
                !victims.contains(&waiting.request.consumer)
                    && gpu.fits_now(&waiting.request, margin)
            })
            .map(|(id, _, _)| id)
    }

    /// Asks preemptible holders of lower priority to make way for `head`,
    /// once it has waited `preempt_after` and cannot be granted because of
    /// them (their memory or their permit): the fewest, lowest priority
    /// first and then the most recently granted (the least work lost). A
    /// holder's priority here is the effective one it was granted at
    /// (`Holding::standing`), so a waiter that aging let through keeps the
    /// GPU until someone outranks what it had.
    /// Nothing is asked while residents are unloading for the head, while
    /// the memory reading is stale, or while earlier requests for it stand.
    pub(super) fn consider_preemption(
        &mut self,
        slot: usize,
        head: WaiterId,
        now: Instant,
        decisions: &mut Decisions<W, H>,
    ) {
        let capacity = self.settings.capacity;
        let margin = self.settings.safety_margin_mib;
        let gpu = &self.gpus[slot];
        let waiting = gpu.waiting.get(head).expect("the head waits");
        if now.saturating_duration_since(waiting.since) < self.settings.preempt_after
            || gpu.admission.as_ref().is_some_and(|a| a.waiter == head)
            || gpu.reading_is_stale()
            || gpu
                .holding
                .values()
                .any(|h| h.preempt.as_ref().is_some_and(|p| p.for_waiter == head))
        {
            return;
        }
        let priority = gpu.waiting.effective(waiting, now);
        let request = &waiting.request;
        let room = gpu.headroom(&request.consumer, margin);
        let fits = |ended: usize, freed: u64| {
            gpu.holding.len() - ended < capacity
                && (request.vram_mib == 0
                    || room + i128::from(freed) >= i128::from(request.vram_mib))
        };
        if fits(0, 0) {
            return;
        }
        let mut candidates: Vec<(&FencingToken, &Holding<H>)> = gpu
            .holding
            .iter()
            .filter(|(_, h)| {
                h.preempt.is_none()
                    && h.standing < priority
                    && self.consumers.is_preemptible(&h.request.consumer)
            })
            .collect();
        candidates.sort_by_key(|(token, h)| (h.standing, std::cmp::Reverse(**token)));
        let (mut chosen, mut freed) = (Vec::new(), 0u64);
        for (token, holding) in candidates {
            chosen.push(*token);
            freed += gpu.holder_mib(holding);
            if fits(chosen.len(), freed) {
                break;
            }
        }
        if !fits(chosen.len(), freed) {
            return;
        }
        let for_consumer = request.consumer.clone();
        let gpu = &mut self.gpus[slot];
        for token in chosen {
            let holding = gpu.holding.get_mut(&token).expect("a holder");
            let grace = self.consumers.preempt_grace(&holding.request.consumer);
            holding.preempt = Some(Preempt {
                for_waiter: head,
                deadline: now + grace,
                revoked: false,
            });
            decisions.preemptions.push(Preemption {
                token,
                consumer: holding.request.consumer.clone(),
                for_consumer: for_consumer.clone(),
                grace,
            });
        }
    }

    /// Revokes the leases asked to make way whose grace has passed, while
    /// the waiter they make way for still waits; forgets the request when
    /// it no longer does.
    pub(super) fn revoke_overdue(
        &mut self,
        slot: usize,
        now: Instant,
        decisions: &mut Decisions<W, H>,
    ) {
        let gpu = &mut self.gpus[slot];
        for (token, holding) in &mut gpu.holding {
            let Some(preempt) = &mut holding.preempt else {
                continue;
            };
            if preempt.revoked || now < preempt.deadline {
                continue;
            }
            if gpu.waiting.contains(preempt.for_waiter) {
                preempt.revoked = true;
                decisions.revocations.push(*token);
            } else {
                holding.preempt = None;
            }
        }
    }
}
