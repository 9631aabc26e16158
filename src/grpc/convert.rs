//! Conversions between the core's types and protobuf. No statuses: errors
//! go through the error table (`status.rs`).

use crate::broker::{BrokerStatus, Grant, PreemptNotice, QueuePosition, lease_id, millis};
use crate::core::{
    Attribution, ConsumerKind, ConsumerRecord, EndCounts, EvictionStats, GpuChoice, GpuView,
    HolderView, Request, RevokeReason, Unload, UnloadRequest, WaiterView,
};
use crate::pb::v1 as pb;

/// The request in an `Acquire`.
pub(crate) fn request(acquire: pb::Acquire) -> Request {
    let gpu = acquire.gpu.trim();
    let gpu = if gpu.is_empty() {
        GpuChoice::Any
    } else if let Ok(index) = gpu.parse() {
        GpuChoice::Index(index)
    } else {
        GpuChoice::Uuid(gpu.to_owned())
    };
    Request {
        consumer: acquire.consumer,
        vram_mib: acquire.vram_mib,
        client_pid: acquire.client_pid,
        // The gRPC layer replaces both once it has checked the claim.
        attribution: None,
        labels: acquire.labels.into_iter().collect(),
        gpu,
        priority: acquire.priority,
    }
}

/// The epoch and token of a lease id (`EPOCH-TOKEN`, the epoch in hex).
pub(crate) fn parse_lease_id(lease_id: &str) -> Option<(Option<u64>, u64)> {
    let (epoch, token) = lease_id.trim().split_once('-')?;
    let epoch = u64::from_str_radix(epoch, 16).ok()?;
    Some((Some(epoch), token.parse().ok()?))
}

/// What a reload did.
pub(crate) fn reloaded(report: crate::reload::ReloadReport) -> pb::ReloadResponse {
    pb::ReloadResponse {
        message: report.message(),
        applied: report.applied,
        needs_restart: report.needs_restart,
    }
}

/// The `Revoked` event, with the message the client reads.
pub(crate) fn revoked(reason: RevokeReason, message: &str) -> pb::LeaseEvent {
    let reason = match reason {
        RevokeReason::Shutdown => pb::RevokeReason::Shutdown,
        RevokeReason::MaxHoldExceeded => pb::RevokeReason::MaxHoldExceeded,
        RevokeReason::Admin => pb::RevokeReason::Admin,
        RevokeReason::Preempted => pb::RevokeReason::Preempted,
    };
    event(pb::lease_event::Kind::Revoked(pb::Revoked {
        reason: reason.into(),
        message: message.to_owned(),
    }))
}

pub(crate) fn granted(grant: &Grant) -> pb::LeaseEvent {
    event(pb::lease_event::Kind::Granted(pb::Granted {
        lease_id: grant.lease_id.clone(),
        fencing_token: grant.token.0,
        broker_epoch: grant.epoch,
        gpu_index: grant.gpu_index,
        gpu_uuid: grant.gpu_uuid.clone(),
        waited_ms: millis(grant.waited),
    }))
}

pub(crate) fn queued(position: &QueuePosition, epoch: u64) -> pb::LeaseEvent {
    let listed = position.holders.len().min(QUEUED_HOLDERS);
    event(pb::lease_event::Kind::Queued(pb::Queued {
        position: position.position,
        queue_depth: position.queue_depth,
        holders: position.holders[..listed]
            .iter()
            .map(|h| holder(h, epoch))
            .collect(),
        gpu_index: position.gpu_index,
        blocked_by: position.blocked_by.clone().unwrap_or_default(),
        holders_omitted: count(position.holders.len() - listed),
        priority: position.priority,
        estimated_wait_ms: estimate_ms(position.estimated_wait),
    }))
}

pub(crate) fn preempt_requested(notice: &PreemptNotice) -> pb::LeaseEvent {
    event(pb::lease_event::Kind::PreemptRequested(
        pb::PreemptRequested {
            grace_ms: millis(notice.grace),
            for_consumer: notice.for_consumer.clone(),
        },
    ))
}

/// How many holders a `Queued` event lists.
const QUEUED_HOLDERS: usize = 16;
/// How many waiters Status lists when the request does not say.
const STATUS_WAITERS: usize = 100;
/// How many waiters Status lists at most, whatever the request says.
const MAX_STATUS_WAITERS: usize = 1_000;
/// How many holders Status lists, in all and per GPU.
const STATUS_HOLDERS: usize = 256;
/// How many consumers Status lists.
const STATUS_CONSUMERS: usize = 1_024;

/// How many waiters a Status for `request` lists.
pub(crate) fn waiters_listed(request: &pb::StatusRequest) -> usize {
    match request.max_waiters {
        0 => STATUS_WAITERS,
        n => usize::try_from(n).map_or(MAX_STATUS_WAITERS, |n| n.min(MAX_STATUS_WAITERS)),
    }
}

/// An estimated wait in milliseconds: 0 means unknown, so a known one is
/// at least 1.
fn estimate_ms(estimate: Option<std::time::Duration>) -> u64 {
    estimate.map_or(0, |wait| millis(wait).max(1))
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn event(kind: pb::lease_event::Kind) -> pb::LeaseEvent {
    pb::LeaseEvent { kind: Some(kind) }
}

fn holder(view: &HolderView, epoch: u64) -> pb::Holder {
    pb::Holder {
        lease_id: lease_id(epoch, view.token),
        consumer: view.request.consumer.clone(),
        fencing_token: view.token.0,
        held_ms: millis(view.held),
        gpu_index: view.gpu_index,
        vram_mib: view.request.vram_mib,
        client_pid: view.request.client_pid,
        labels: view.request.labels.clone().into_iter().collect(),
        peak_mib: view.peak_mib,
        priority: view.priority,
        preempt_requested: view.preempt_requested,
        attribution: attribution(view.request.attribution),
    }
}

fn attribution(how: Option<Attribution>) -> String {
    how.map(Attribution::as_str).unwrap_or_default().to_owned()
}

fn waiter(view: &WaiterView) -> pb::Waiter {
    pb::Waiter {
        consumer: view.request.consumer.clone(),
        position: view.position,
        waiting_ms: millis(view.waiting),
        vram_mib: view.request.vram_mib,
        client_pid: view.request.client_pid,
        labels: view.request.labels.clone().into_iter().collect(),
        gpu_index: view.gpu_index,
        priority: view.priority,
        estimated_wait_ms: estimate_ms(view.estimated_wait),
        attribution: attribution(view.request.attribution),
    }
}

fn consumer(
    record: &ConsumerRecord,
    unload: &str,
    matcher: &str,
    now: std::time::Instant,
) -> pb::Consumer {
    let profile = record.profile.as_ref();
    let kind = match profile.map(|p| p.kind) {
        None => pb::ConsumerKind::Unspecified,
        Some(ConsumerKind::Tts) => pb::ConsumerKind::Tts,
        Some(ConsumerKind::Llm) => pb::ConsumerKind::Llm,
        Some(ConsumerKind::Image) => pb::ConsumerKind::Image,
        Some(ConsumerKind::Other) => pb::ConsumerKind::Other,
    };
    pb::Consumer {
        name: record.name.clone(),
        kind: kind.into(),
        configured: profile.is_some(),
        vram_mib: profile.map_or(0, |p| p.vram_mib),
        coexist: profile.is_some_and(|p| p.coexist),
        grants: record.grants,
        last_active_ms_ago: record.idle_for(now).map_or(0, millis),
        holding: record.holding > 0,
        waiting: record.waiting,
        peak_mib: record.peak_mib,
        unload: unload.to_owned(),
        priority: profile.map_or(0, |p| p.priority),
        preemptible: profile.is_some_and(|p| p.preemptible),
        matcher: matcher.to_owned(),
    }
}

/// One GPU, with at most `waiters` of its waiters, and its lists without
/// labels: those are in the top-level lists, and are never sent twice.
fn gpu(view: &GpuView, epoch: u64, waiters: usize) -> pb::Gpu {
    let (used_mib, free_mib, headroom_mib) = match &view.reading {
        Some(reading) => (reading.used_mib, reading.free_mib, view.headroom_mib),
        // Unknown size, no readings: nothing to say.
        None if view.spec.total_mib == 0 => (0, 0, 0),
        None => {
            let free = u64::try_from(view.headroom_mib.max(0)).unwrap_or(0);
            (
                view.spec.total_mib.saturating_sub(free),
                free,
                view.headroom_mib,
            )
        }
    };
    pb::Gpu {
        index: view.spec.index,
        uuid: view.spec.uuid.clone(),
        name: view.spec.name.clone(),
        total_mib: view.spec.total_mib,
        used_mib,
        free_mib,
        measured: view.spec.measured,
        headroom_mib,
        holders: view
            .holders
            .iter()
            .take(STATUS_HOLDERS)
            .map(|h| pb::Holder {
                labels: Default::default(),
                ..holder(h, epoch)
            })
            .collect(),
        waiters: view
            .waiters
            .iter()
            .take(waiters)
            .map(|w| pb::Waiter {
                labels: Default::default(),
                ..waiter(w)
            })
            .collect(),
        waiters_omitted: count(
            view.queue_depth
                .saturating_sub(waiters.min(view.waiters.len())),
        ),
        holders_omitted: count(view.holders.len().saturating_sub(STATUS_HOLDERS)),
        residents: view
            .residents
            .iter()
            .map(|r| pb::Resident {
                consumer: r.resident.consumer.clone(),
                footprint_mib: r.resident.footprint_mib,
                idle_ms: millis(r.idle),
                pid: r.resident.pid,
                unload_requested: r.resident.unload == Unload::Requested,
                unload_failed: r.resident.unload == Unload::NotFreed,
                peak_mib: r.peak_mib,
                attribution: attribution(r.resident.attribution),
            })
            .collect(),
        blocked_by: view
            .blocked
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        unleased: view
            .unleased
            .iter()
            .map(|p| pb::GpuProcess {
                pid: p.pid,
                used_mib: p.used_mib,
                consumer: String::new(),
                attribution: String::new(),
            })
            .collect(),
        processes: view
            .processes
            .iter()
            .map(|p| pb::GpuProcess {
                pid: p.process.pid,
                used_mib: p.process.used_mib,
                consumer: p.consumer.clone(),
                attribution: attribution(p.attribution),
            })
            .collect(),
        reserved_for: view.reserved_for.clone().unwrap_or_default(),
    }
}

fn evictions(stats: &EvictionStats) -> pb::Evictions {
    pb::Evictions {
        requested: stats.requested,
        completed: stats.completed,
        failed: stats.failed,
        last_victim: stats.last_victim.clone(),
        last_unload_ms: millis(stats.last_unload),
    }
}

pub(crate) fn unload_requested(
    request: &UnloadRequest,
    deadline: std::time::Duration,
) -> pb::ResidencyCommand {
    pb::ResidencyCommand {
        kind: Some(pb::residency_command::Kind::UnloadRequested(
            pb::UnloadRequested {
                gpu_index: request.gpu_index,
                footprint_mib: request.footprint_mib,
                for_consumer: request.for_consumer.clone(),
                deadline_ms: millis(deadline),
                peak_mib: request.peak_mib,
            },
        )),
    }
}

fn ended(counts: EndCounts) -> pb::LeaseEndCounts {
    pb::LeaseEndCounts {
        released: counts.released,
        half_closed: counts.half_closed,
        disconnected: counts.disconnected,
        revoked: counts.revoked,
        withdrawn: counts.withdrawn,
        expired: counts.expired,
        unclaimed: counts.unclaimed,
    }
}

/// The snapshot, with at most `waiters` waiters listed; every list is
/// capped, and what is left out is counted, so that it stays small however
/// long the queue is.
pub(crate) fn status(
    status: &BrokerStatus,
    now: std::time::Instant,
    waiters: usize,
) -> pb::StatusResponse {
    let core = &status.core;
    pb::StatusResponse {
        capacity: core.total_capacity,
        capacity_per_gpu: core.capacity_per_gpu,
        total_capacity: core.total_capacity,
        in_flight: u32::try_from(core.holders.len()).unwrap_or(u32::MAX),
        queue_depth: count(core.queue_depth),
        total_grants: core.total_grants,
        last_wait_ms: millis(core.last_wait),
        last_hold_ms: millis(core.last_hold),
        oldest_queued_ms: millis(core.oldest_queued),
        holders: core
            .holders
            .iter()
            .take(STATUS_HOLDERS)
            .map(|h| holder(h, status.epoch))
            .collect(),
        holders_omitted: count(core.holders.len().saturating_sub(STATUS_HOLDERS)),
        waiters: core.waiters.iter().take(waiters).map(waiter).collect(),
        waiters_omitted: count(
            core.queue_depth
                .saturating_sub(waiters.min(core.waiters.len())),
        ),
        consumers: core
            .consumers
            .iter()
            .take(STATUS_CONSUMERS)
            .map(|c| {
                let unload = status.unload.get(&c.name).copied().unwrap_or("");
                let matcher = status.matchers.get(&c.name).map_or("", String::as_str);
                consumer(c, unload, matcher, now)
            })
            .collect(),
        consumers_omitted: count(core.consumers.len().saturating_sub(STATUS_CONSUMERS)),
        broker: Some(pb::BrokerInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            epoch: status.epoch,
            uptime_ms: millis(status.uptime),
            shutting_down: status.shutting_down,
            reloads: status.reloads.applied,
            last_reload_error: status.reloads.last_error.clone(),
            log_lines_dropped: status.log_lines_dropped,
        }),
        ended: Some(ended(core.ended)),
        gpus: core
            .gpus
            .iter()
            .map(|g| gpu(g, status.epoch, waiters))
            .collect(),
        evictions: Some(evictions(&core.evictions)),
        inventory: status.inventory.to_owned(),
    }
}
