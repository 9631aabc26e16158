from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RevokeReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REVOKE_REASON_UNSPECIFIED: _ClassVar[RevokeReason]
    REVOKE_REASON_SHUTDOWN: _ClassVar[RevokeReason]
    REVOKE_REASON_MAX_HOLD_EXCEEDED: _ClassVar[RevokeReason]
    REVOKE_REASON_ADMIN: _ClassVar[RevokeReason]
    REVOKE_REASON_PREEMPTED: _ClassVar[RevokeReason]

class ConsumerKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONSUMER_KIND_UNSPECIFIED: _ClassVar[ConsumerKind]
    CONSUMER_KIND_TTS: _ClassVar[ConsumerKind]
    CONSUMER_KIND_LLM: _ClassVar[ConsumerKind]
    CONSUMER_KIND_IMAGE: _ClassVar[ConsumerKind]
    CONSUMER_KIND_OTHER: _ClassVar[ConsumerKind]
REVOKE_REASON_UNSPECIFIED: RevokeReason
REVOKE_REASON_SHUTDOWN: RevokeReason
REVOKE_REASON_MAX_HOLD_EXCEEDED: RevokeReason
REVOKE_REASON_ADMIN: RevokeReason
REVOKE_REASON_PREEMPTED: RevokeReason
CONSUMER_KIND_UNSPECIFIED: ConsumerKind
CONSUMER_KIND_TTS: ConsumerKind
CONSUMER_KIND_LLM: ConsumerKind
CONSUMER_KIND_IMAGE: ConsumerKind
CONSUMER_KIND_OTHER: ConsumerKind

class RevokeLeaseRequest(_message.Message):
    __slots__ = ("lease_id", "fencing_token", "message")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    fencing_token: int
    message: str
    def __init__(self, lease_id: _Optional[str] = ..., fencing_token: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class RevokeLeaseResponse(_message.Message):
    __slots__ = ("revoked", "message", "consumer")
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    revoked: bool
    message: str
    consumer: str
    def __init__(self, revoked: bool = ..., message: _Optional[str] = ..., consumer: _Optional[str] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("acquire", "release")
    ACQUIRE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    acquire: Acquire
    release: Release
    def __init__(self, acquire: _Optional[_Union[Acquire, _Mapping]] = ..., release: _Optional[_Union[Release, _Mapping]] = ...) -> None: ...

class Acquire(_message.Message):
    __slots__ = ("consumer", "vram_mib", "max_wait_ms", "client_pid", "labels", "gpu", "priority")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    VRAM_MIB_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    consumer: str
    vram_mib: int
    max_wait_ms: int
    client_pid: int
    labels: _containers.ScalarMap[str, str]
    gpu: str
    priority: int
    def __init__(self, consumer: _Optional[str] = ..., vram_mib: _Optional[int] = ..., max_wait_ms: _Optional[int] = ..., client_pid: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., gpu: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaseEvent(_message.Message):
    __slots__ = ("queued", "granted", "revoked", "preempt_requested")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    PREEMPT_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    queued: Queued
    granted: Granted
    revoked: Revoked
    preempt_requested: PreemptRequested
    def __init__(self, queued: _Optional[_Union[Queued, _Mapping]] = ..., granted: _Optional[_Union[Granted, _Mapping]] = ..., revoked: _Optional[_Union[Revoked, _Mapping]] = ..., preempt_requested: _Optional[_Union[PreemptRequested, _Mapping]] = ...) -> None: ...

class PreemptRequested(_message.Message):
    __slots__ = ("grace_ms", "for_consumer")
    GRACE_MS_FIELD_NUMBER: _ClassVar[int]
    FOR_CONSUMER_FIELD_NUMBER: _ClassVar[int]
    grace_ms: int
    for_consumer: str
    def __init__(self, grace_ms: _Optional[int] = ..., for_consumer: _Optional[str] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position", "queue_depth", "holders", "gpu_index", "blocked_by", "priority", "estimated_wait_ms", "holders_omitted")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_BY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_OMITTED_FIELD_NUMBER: _ClassVar[int]
    position: int
    queue_depth: int
    holders: _containers.RepeatedCompositeFieldContainer[Holder]
    gpu_index: int
    blocked_by: str
    priority: int
    estimated_wait_ms: int
    holders_omitted: int
    def __init__(self, position: _Optional[int] = ..., queue_depth: _Optional[int] = ..., holders: _Optional[_Iterable[_Union[Holder, _Mapping]]] = ..., gpu_index: _Optional[int] = ..., blocked_by: _Optional[str] = ..., priority: _Optional[int] = ..., estimated_wait_ms: _Optional[int] = ..., holders_omitted: _Optional[int] = ...) -> None: ...

class Granted(_message.Message):
    __slots__ = ("lease_id", "fencing_token", "broker_epoch", "gpu_index", "gpu_uuid", "waited_ms")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    BROKER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    WAITED_MS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    fencing_token: int
    broker_epoch: int
    gpu_index: int
    gpu_uuid: str
    waited_ms: int
    def __init__(self, lease_id: _Optional[str] = ..., fencing_token: _Optional[int] = ..., broker_epoch: _Optional[int] = ..., gpu_index: _Optional[int] = ..., gpu_uuid: _Optional[str] = ..., waited_ms: _Optional[int] = ...) -> None: ...

class Revoked(_message.Message):
    __slots__ = ("reason", "message")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    reason: RevokeReason
    message: str
    def __init__(self, reason: _Optional[_Union[RevokeReason, str]] = ..., message: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("max_waiters",)
    MAX_WAITERS_FIELD_NUMBER: _ClassVar[int]
    max_waiters: int
    def __init__(self, max_waiters: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("capacity", "in_flight", "queue_depth", "total_grants", "last_wait_ms", "last_hold_ms", "oldest_queued_ms", "holders", "waiters", "consumers", "broker", "ended", "gpus", "evictions", "inventory", "waiters_omitted", "holders_omitted", "consumers_omitted", "capacity_per_gpu", "total_capacity")
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_GRANTS_FIELD_NUMBER: _ClassVar[int]
    LAST_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_HOLD_MS_FIELD_NUMBER: _ClassVar[int]
    OLDEST_QUEUED_MS_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    WAITERS_FIELD_NUMBER: _ClassVar[int]
    CONSUMERS_FIELD_NUMBER: _ClassVar[int]
    BROKER_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    WAITERS_OMITTED_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_OMITTED_FIELD_NUMBER: _ClassVar[int]
    CONSUMERS_OMITTED_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_PER_GPU_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    capacity: int
    in_flight: int
    queue_depth: int
    total_grants: int
    last_wait_ms: int
    last_hold_ms: int
    oldest_queued_ms: int
    holders: _containers.RepeatedCompositeFieldContainer[Holder]
    waiters: _containers.RepeatedCompositeFieldContainer[Waiter]
    consumers: _containers.RepeatedCompositeFieldContainer[Consumer]
    broker: BrokerInfo
    ended: LeaseEndCounts
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    evictions: Evictions
    inventory: str
    waiters_omitted: int
    holders_omitted: int
    consumers_omitted: int
    capacity_per_gpu: int
    total_capacity: int
    def __init__(self, capacity: _Optional[int] = ..., in_flight: _Optional[int] = ..., queue_depth: _Optional[int] = ..., total_grants: _Optional[int] = ..., last_wait_ms: _Optional[int] = ..., last_hold_ms: _Optional[int] = ..., oldest_queued_ms: _Optional[int] = ..., holders: _Optional[_Iterable[_Union[Holder, _Mapping]]] = ..., waiters: _Optional[_Iterable[_Union[Waiter, _Mapping]]] = ..., consumers: _Optional[_Iterable[_Union[Consumer, _Mapping]]] = ..., broker: _Optional[_Union[BrokerInfo, _Mapping]] = ..., ended: _Optional[_Union[LeaseEndCounts, _Mapping]] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., evictions: _Optional[_Union[Evictions, _Mapping]] = ..., inventory: _Optional[str] = ..., waiters_omitted: _Optional[int] = ..., holders_omitted: _Optional[int] = ..., consumers_omitted: _Optional[int] = ..., capacity_per_gpu: _Optional[int] = ..., total_capacity: _Optional[int] = ...) -> None: ...

class Gpu(_message.Message):
    __slots__ = ("index", "uuid", "name", "total_mib", "used_mib", "free_mib", "measured", "headroom_mib", "holders", "waiters", "residents", "blocked_by", "unleased", "reserved_for", "waiters_omitted", "holders_omitted", "processes")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MIB_FIELD_NUMBER: _ClassVar[int]
    USED_MIB_FIELD_NUMBER: _ClassVar[int]
    FREE_MIB_FIELD_NUMBER: _ClassVar[int]
    MEASURED_FIELD_NUMBER: _ClassVar[int]
    HEADROOM_MIB_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    WAITERS_FIELD_NUMBER: _ClassVar[int]
    RESIDENTS_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_BY_FIELD_NUMBER: _ClassVar[int]
    UNLEASED_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FOR_FIELD_NUMBER: _ClassVar[int]
    WAITERS_OMITTED_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_OMITTED_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    name: str
    total_mib: int
    used_mib: int
    free_mib: int
    measured: bool
    headroom_mib: int
    holders: _containers.RepeatedCompositeFieldContainer[Holder]
    waiters: _containers.RepeatedCompositeFieldContainer[Waiter]
    residents: _containers.RepeatedCompositeFieldContainer[Resident]
    blocked_by: str
    unleased: _containers.RepeatedCompositeFieldContainer[GpuProcess]
    reserved_for: str
    waiters_omitted: int
    holders_omitted: int
    processes: _containers.RepeatedCompositeFieldContainer[GpuProcess]
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., name: _Optional[str] = ..., total_mib: _Optional[int] = ..., used_mib: _Optional[int] = ..., free_mib: _Optional[int] = ..., measured: bool = ..., headroom_mib: _Optional[int] = ..., holders: _Optional[_Iterable[_Union[Holder, _Mapping]]] = ..., waiters: _Optional[_Iterable[_Union[Waiter, _Mapping]]] = ..., residents: _Optional[_Iterable[_Union[Resident, _Mapping]]] = ..., blocked_by: _Optional[str] = ..., unleased: _Optional[_Iterable[_Union[GpuProcess, _Mapping]]] = ..., reserved_for: _Optional[str] = ..., waiters_omitted: _Optional[int] = ..., holders_omitted: _Optional[int] = ..., processes: _Optional[_Iterable[_Union[GpuProcess, _Mapping]]] = ...) -> None: ...

class Resident(_message.Message):
    __slots__ = ("consumer", "footprint_mib", "idle_ms", "pid", "unload_requested", "unload_failed", "peak_mib", "attribution")
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    FOOTPRINT_MIB_FIELD_NUMBER: _ClassVar[int]
    IDLE_MS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UNLOAD_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    UNLOAD_FAILED_FIELD_NUMBER: _ClassVar[int]
    PEAK_MIB_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    consumer: str
    footprint_mib: int
    idle_ms: int
    pid: int
    unload_requested: bool
    unload_failed: bool
    peak_mib: int
    attribution: str
    def __init__(self, consumer: _Optional[str] = ..., footprint_mib: _Optional[int] = ..., idle_ms: _Optional[int] = ..., pid: _Optional[int] = ..., unload_requested: bool = ..., unload_failed: bool = ..., peak_mib: _Optional[int] = ..., attribution: _Optional[str] = ...) -> None: ...

class GpuProcess(_message.Message):
    __slots__ = ("pid", "used_mib", "consumer", "attribution")
    PID_FIELD_NUMBER: _ClassVar[int]
    USED_MIB_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    pid: int
    used_mib: int
    consumer: str
    attribution: str
    def __init__(self, pid: _Optional[int] = ..., used_mib: _Optional[int] = ..., consumer: _Optional[str] = ..., attribution: _Optional[str] = ...) -> None: ...

class Evictions(_message.Message):
    __slots__ = ("requested", "completed", "failed", "last_victim", "last_unload_ms")
    REQUESTED_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    LAST_VICTIM_FIELD_NUMBER: _ClassVar[int]
    LAST_UNLOAD_MS_FIELD_NUMBER: _ClassVar[int]
    requested: int
    completed: int
    failed: int
    last_victim: str
    last_unload_ms: int
    def __init__(self, requested: _Optional[int] = ..., completed: _Optional[int] = ..., failed: _Optional[int] = ..., last_victim: _Optional[str] = ..., last_unload_ms: _Optional[int] = ...) -> None: ...

class ResidencyReport(_message.Message):
    __slots__ = ("hello", "unloaded")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    UNLOADED_FIELD_NUMBER: _ClassVar[int]
    hello: ResidencyHello
    unloaded: Unloaded
    def __init__(self, hello: _Optional[_Union[ResidencyHello, _Mapping]] = ..., unloaded: _Optional[_Union[Unloaded, _Mapping]] = ...) -> None: ...

class ResidencyHello(_message.Message):
    __slots__ = ("consumer",)
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    consumer: str
    def __init__(self, consumer: _Optional[str] = ...) -> None: ...

class Unloaded(_message.Message):
    __slots__ = ("gpu_index", "all_gpus")
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    ALL_GPUS_FIELD_NUMBER: _ClassVar[int]
    gpu_index: int
    all_gpus: bool
    def __init__(self, gpu_index: _Optional[int] = ..., all_gpus: bool = ...) -> None: ...

class ResidencyCommand(_message.Message):
    __slots__ = ("unload_requested",)
    UNLOAD_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    unload_requested: UnloadRequested
    def __init__(self, unload_requested: _Optional[_Union[UnloadRequested, _Mapping]] = ...) -> None: ...

class UnloadRequested(_message.Message):
    __slots__ = ("gpu_index", "footprint_mib", "for_consumer", "deadline_ms", "peak_mib")
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    FOOTPRINT_MIB_FIELD_NUMBER: _ClassVar[int]
    FOR_CONSUMER_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    PEAK_MIB_FIELD_NUMBER: _ClassVar[int]
    gpu_index: int
    footprint_mib: int
    for_consumer: str
    deadline_ms: int
    peak_mib: int
    def __init__(self, gpu_index: _Optional[int] = ..., footprint_mib: _Optional[int] = ..., for_consumer: _Optional[str] = ..., deadline_ms: _Optional[int] = ..., peak_mib: _Optional[int] = ...) -> None: ...

class Holder(_message.Message):
    __slots__ = ("lease_id", "consumer", "fencing_token", "held_ms", "gpu_index", "vram_mib", "client_pid", "labels", "peak_mib", "priority", "preempt_requested", "attribution")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HELD_MS_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    VRAM_MIB_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PEAK_MIB_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PREEMPT_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    consumer: str
    fencing_token: int
    held_ms: int
    gpu_index: int
    vram_mib: int
    client_pid: int
    labels: _containers.ScalarMap[str, str]
    peak_mib: int
    priority: int
    preempt_requested: bool
    attribution: str
    def __init__(self, lease_id: _Optional[str] = ..., consumer: _Optional[str] = ..., fencing_token: _Optional[int] = ..., held_ms: _Optional[int] = ..., gpu_index: _Optional[int] = ..., vram_mib: _Optional[int] = ..., client_pid: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., peak_mib: _Optional[int] = ..., priority: _Optional[int] = ..., preempt_requested: bool = ..., attribution: _Optional[str] = ...) -> None: ...

class Waiter(_message.Message):
    __slots__ = ("consumer", "position", "waiting_ms", "vram_mib", "client_pid", "labels", "gpu_index", "priority", "estimated_wait_ms", "attribution")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    WAITING_MS_FIELD_NUMBER: _ClassVar[int]
    VRAM_MIB_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    consumer: str
    position: int
    waiting_ms: int
    vram_mib: int
    client_pid: int
    labels: _containers.ScalarMap[str, str]
    gpu_index: int
    priority: int
    estimated_wait_ms: int
    attribution: str
    def __init__(self, consumer: _Optional[str] = ..., position: _Optional[int] = ..., waiting_ms: _Optional[int] = ..., vram_mib: _Optional[int] = ..., client_pid: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., gpu_index: _Optional[int] = ..., priority: _Optional[int] = ..., estimated_wait_ms: _Optional[int] = ..., attribution: _Optional[str] = ...) -> None: ...

class Consumer(_message.Message):
    __slots__ = ("name", "kind", "configured", "vram_mib", "coexist", "grants", "last_active_ms_ago", "holding", "waiting", "peak_mib", "unload", "priority", "preemptible", "matcher")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    VRAM_MIB_FIELD_NUMBER: _ClassVar[int]
    COEXIST_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVE_MS_AGO_FIELD_NUMBER: _ClassVar[int]
    HOLDING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    PEAK_MIB_FIELD_NUMBER: _ClassVar[int]
    UNLOAD_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIBLE_FIELD_NUMBER: _ClassVar[int]
    MATCHER_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: ConsumerKind
    configured: bool
    vram_mib: int
    coexist: bool
    grants: int
    last_active_ms_ago: int
    holding: bool
    waiting: int
    peak_mib: int
    unload: str
    priority: int
    preemptible: bool
    matcher: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[ConsumerKind, str]] = ..., configured: bool = ..., vram_mib: _Optional[int] = ..., coexist: bool = ..., grants: _Optional[int] = ..., last_active_ms_ago: _Optional[int] = ..., holding: bool = ..., waiting: _Optional[int] = ..., peak_mib: _Optional[int] = ..., unload: _Optional[str] = ..., priority: _Optional[int] = ..., preemptible: bool = ..., matcher: _Optional[str] = ...) -> None: ...

class BrokerInfo(_message.Message):
    __slots__ = ("version", "epoch", "uptime_ms", "shutting_down", "reloads", "last_reload_error", "log_lines_dropped")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    UPTIME_MS_FIELD_NUMBER: _ClassVar[int]
    SHUTTING_DOWN_FIELD_NUMBER: _ClassVar[int]
    RELOADS_FIELD_NUMBER: _ClassVar[int]
    LAST_RELOAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    LOG_LINES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    version: str
    epoch: int
    uptime_ms: int
    shutting_down: bool
    reloads: int
    last_reload_error: str
    log_lines_dropped: int
    def __init__(self, version: _Optional[str] = ..., epoch: _Optional[int] = ..., uptime_ms: _Optional[int] = ..., shutting_down: bool = ..., reloads: _Optional[int] = ..., last_reload_error: _Optional[str] = ..., log_lines_dropped: _Optional[int] = ...) -> None: ...

class LeaseEndCounts(_message.Message):
    __slots__ = ("released", "half_closed", "disconnected", "revoked", "withdrawn", "expired", "unclaimed")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    HALF_CLOSED_FIELD_NUMBER: _ClassVar[int]
    DISCONNECTED_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWN_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    UNCLAIMED_FIELD_NUMBER: _ClassVar[int]
    released: int
    half_closed: int
    disconnected: int
    revoked: int
    withdrawn: int
    expired: int
    unclaimed: int
    def __init__(self, released: _Optional[int] = ..., half_closed: _Optional[int] = ..., disconnected: _Optional[int] = ..., revoked: _Optional[int] = ..., withdrawn: _Optional[int] = ..., expired: _Optional[int] = ..., unclaimed: _Optional[int] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("applied", "needs_restart", "message")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    NEEDS_RESTART_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    applied: _containers.RepeatedScalarFieldContainer[str]
    needs_restart: _containers.RepeatedScalarFieldContainer[str]
    message: str
    def __init__(self, applied: _Optional[_Iterable[str]] = ..., needs_restart: _Optional[_Iterable[str]] = ..., message: _Optional[str] = ...) -> None: ...
