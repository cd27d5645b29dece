from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Event(_message.Message):
    __slots__ = ("id", "device_id", "kind", "timestamp_ms", "payload_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    device_id: str
    kind: str
    timestamp_ms: int
    payload_json: str
    def __init__(self, id: _Optional[str] = ..., device_id: _Optional[str] = ..., kind: _Optional[str] = ..., timestamp_ms: _Optional[int] = ..., payload_json: _Optional[str] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("device_id", "events")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, device_id: _Optional[str] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("acknowledged_ids", "duplicates", "stats_out_of_window", "clock_skew_ms")
    ACKNOWLEDGED_IDS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    STATS_OUT_OF_WINDOW_FIELD_NUMBER: _ClassVar[int]
    CLOCK_SKEW_MS_FIELD_NUMBER: _ClassVar[int]
    acknowledged_ids: _containers.RepeatedScalarFieldContainer[str]
    duplicates: int
    stats_out_of_window: int
    clock_skew_ms: int
    def __init__(self, acknowledged_ids: _Optional[_Iterable[str]] = ..., duplicates: _Optional[int] = ..., stats_out_of_window: _Optional[int] = ..., clock_skew_ms: _Optional[int] = ...) -> None: ...

class FleetStatusRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state", "model_name", "version", "stale_since_ms")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STALE_SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: str
    model_name: str
    version: str
    stale_since_ms: int
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[str] = ..., model_name: _Optional[str] = ..., version: _Optional[str] = ..., stale_since_ms: _Optional[int] = ...) -> None: ...

class DeviceStatus(_message.Message):
    __slots__ = ("device_id", "model_name", "target_key", "desired_version", "serving_version", "state", "validation_result", "p50_ms", "p99_ms", "last_seen_ms", "facts_json", "batching_json", "variant_json", "stats_out_of_window", "clock_skew_ms", "clock_skew_known", "drift_json", "serving_since_ms", "feedback_labels", "feedback_known", "feedback_correct")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    TARGET_KEY_FIELD_NUMBER: _ClassVar[int]
    DESIRED_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_RESULT_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_MS_FIELD_NUMBER: _ClassVar[int]
    FACTS_JSON_FIELD_NUMBER: _ClassVar[int]
    BATCHING_JSON_FIELD_NUMBER: _ClassVar[int]
    VARIANT_JSON_FIELD_NUMBER: _ClassVar[int]
    STATS_OUT_OF_WINDOW_FIELD_NUMBER: _ClassVar[int]
    CLOCK_SKEW_MS_FIELD_NUMBER: _ClassVar[int]
    CLOCK_SKEW_KNOWN_FIELD_NUMBER: _ClassVar[int]
    DRIFT_JSON_FIELD_NUMBER: _ClassVar[int]
    SERVING_SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_LABELS_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_KNOWN_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_CORRECT_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    model_name: str
    target_key: str
    desired_version: str
    serving_version: str
    state: str
    validation_result: str
    p50_ms: float
    p99_ms: float
    last_seen_ms: int
    facts_json: str
    batching_json: str
    variant_json: str
    stats_out_of_window: int
    clock_skew_ms: int
    clock_skew_known: bool
    drift_json: str
    serving_since_ms: int
    feedback_labels: int
    feedback_known: int
    feedback_correct: int
    def __init__(self, device_id: _Optional[str] = ..., model_name: _Optional[str] = ..., target_key: _Optional[str] = ..., desired_version: _Optional[str] = ..., serving_version: _Optional[str] = ..., state: _Optional[str] = ..., validation_result: _Optional[str] = ..., p50_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., last_seen_ms: _Optional[int] = ..., facts_json: _Optional[str] = ..., batching_json: _Optional[str] = ..., variant_json: _Optional[str] = ..., stats_out_of_window: _Optional[int] = ..., clock_skew_ms: _Optional[int] = ..., clock_skew_known: bool = ..., drift_json: _Optional[str] = ..., serving_since_ms: _Optional[int] = ..., feedback_labels: _Optional[int] = ..., feedback_known: _Optional[int] = ..., feedback_correct: _Optional[int] = ...) -> None: ...

class FleetStatusResponse(_message.Message):
    __slots__ = ("devices", "next_page_token", "state_counts", "total")
    class StateCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceStatus]
    next_page_token: str
    state_counts: _containers.ScalarMap[str, int]
    total: int
    def __init__(self, devices: _Optional[_Iterable[_Union[DeviceStatus, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., state_counts: _Optional[_Mapping[str, int]] = ..., total: _Optional[int] = ...) -> None: ...
