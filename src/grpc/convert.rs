//! Conversions between the core's types and protobuf, and the one table that
//! maps the broker's errors to gRPC status codes.

use std::sync::Arc;

use tonic::{Code, Status};

use crate::broker::{BrokerStatus, EnqueueError, Grant, QueuePosition, lease_id, millis};
use crate::core::{
    ConsumerKind, ConsumerRecord, EndCounts, EvictionStats, GpuChoice, GpuView, HolderView,
    Rejection, Request, RevokeReason, UnloadRequest, WaiterView,
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
        labels: acquire.labels.into_iter().collect(),
        gpu,
    }
}

/// The epoch and token of a lease id (`EPOCH-TOKEN`, the epoch in hex).
pub(crate) fn parse_lease_id(lease_id: &str) -> Option<(Option<u64>, u64)> {
    let (epoch, token) = lease_id.trim().split_once('-')?;
    let epoch = u64::from_str_radix(epoch, 16).ok()?;
    Some((Some(epoch), token.parse().ok()?))
}

/// The gRPC status for a request that cannot join the queue.
pub(crate) fn enqueue_error(error: &EnqueueError) -> Status {
    match error {
        EnqueueError::Rejected(Rejection::BadName(_)) => {
            Status::invalid_argument(error.to_string())
        }
        EnqueueError::Rejected(Rejection::UnknownConsumer(_)) => {
            Status::permission_denied(error.to_string())
        }
        EnqueueError::Rejected(Rejection::UnknownGpu(..)) => {
            Status::invalid_argument(error.to_string())
        }
        EnqueueError::Rejected(Rejection::TooLarge { .. }) => {
            Status::resource_exhausted(error.to_string())
        }
        EnqueueError::ShuttingDown => Status::unavailable(error.to_string()),
    }
}

/// What a reload did, or the status of one that changed nothing.
pub(crate) fn reloaded(
    outcome: Result<crate::reload::ReloadReport, crate::reload::ReloadError>,
) -> Result<pb::ReloadResponse, Status> {
    match outcome {
        Ok(report) => Ok(pb::ReloadResponse {
            message: report.message(),
            applied: report.applied,
            needs_restart: report.needs_restart,
        }),
        // The file must change before a reload can succeed.
        Err(error) => Err(Status::failed_precondition(error.to_string())),
    }
}

/// The status that ends a stream after `Revoked`.
pub(crate) fn revoked_status(reason: RevokeReason) -> Status {
    match reason {
        RevokeReason::Shutdown => Status::unavailable("lease revoked: the broker is shutting down"),
        RevokeReason::MaxHoldExceeded => Status::new(
            Code::Aborted,
            "lease revoked: held longer than the broker's max_hold",
        ),
        RevokeReason::Admin => Status::new(Code::Aborted, "lease revoked by an operator"),
    }
}

pub(crate) fn revoked(reason: RevokeReason, message: &str) -> pb::LeaseEvent {
    let reason = match reason {
        RevokeReason::Shutdown => pb::RevokeReason::Shutdown,
        RevokeReason::MaxHoldExceeded => pb::RevokeReason::MaxHoldExceeded,
        RevokeReason::Admin => pb::RevokeReason::Admin,
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
    event(pb::lease_event::Kind::Queued(pb::Queued {
        position: position.position,
        queue_depth: position.queue_depth,
        holders: holders(&position.holders, epoch),
        gpu_index: position.gpu_index,
        blocked_by: position.blocked_by.clone().unwrap_or_default(),
    }))
}

fn event(kind: pb::lease_event::Kind) -> pb::LeaseEvent {
    pb::LeaseEvent { kind: Some(kind) }
}

fn holders(holders: &Arc<[HolderView]>, epoch: u64) -> Vec<pb::Holder> {
    holders.iter().map(|h| holder(h, epoch)).collect()
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
    }
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
    }
}

fn consumer(record: &ConsumerRecord, unload: &str, now: std::time::Instant) -> pb::Consumer {
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
    }
}

fn gpu(view: &GpuView, epoch: u64) -> pb::Gpu {
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
        holders: view.holders.iter().map(|h| holder(h, epoch)).collect(),
        waiters: view.waiters.iter().map(waiter).collect(),
        residents: view
            .residents
            .iter()
            .map(|r| pb::Resident {
                consumer: r.resident.consumer.clone(),
                footprint_mib: r.resident.footprint_mib,
                idle_ms: millis(r.idle),
                pid: r.resident.pid,
                unload_requested: r.resident.unload_requested.is_some()
                    && !r.resident.unload_failed,
                unload_failed: r.resident.unload_failed,
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
            })
            .collect(),
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
    }
}

pub(crate) fn status(status: &BrokerStatus, now: std::time::Instant) -> pb::StatusResponse {
    let core = &status.core;
    pb::StatusResponse {
        capacity: core.capacity,
        in_flight: u32::try_from(core.holders.len()).unwrap_or(u32::MAX),
        queue_depth: u32::try_from(core.waiters.len()).unwrap_or(u32::MAX),
        total_grants: core.total_grants,
        last_wait_ms: millis(core.last_wait),
        last_hold_ms: millis(core.last_hold),
        oldest_queued_ms: millis(core.oldest_queued),
        holders: core
            .holders
            .iter()
            .map(|h| holder(h, status.epoch))
            .collect(),
        waiters: core.waiters.iter().map(waiter).collect(),
        consumers: core
            .consumers
            .iter()
            .map(|c| consumer(c, status.unload.get(&c.name).copied().unwrap_or(""), now))
            .collect(),
        broker: Some(pb::BrokerInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            epoch: status.epoch,
            uptime_ms: millis(status.uptime),
            shutting_down: status.shutting_down,
            reloads: status.reloads.applied,
            last_reload_error: status.reloads.last_error.clone(),
        }),
        ended: Some(ended(core.ended)),
        gpus: core.gpus.iter().map(|g| gpu(g, status.epoch)).collect(),
        evictions: Some(evictions(&core.evictions)),
        inventory: status.inventory.to_owned(),
    }
}
