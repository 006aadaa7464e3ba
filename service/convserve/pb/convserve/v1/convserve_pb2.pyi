from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]

class Layout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYOUT_UNSPECIFIED: _ClassVar[Layout]
    NHWC: _ClassVar[Layout]
    NCHW: _ClassVar[Layout]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    QUEUED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    PROMOTED: _ClassVar[JobState]
    REJECTED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]
    INTERRUPTED: _ClassVar[JobState]
DTYPE_UNSPECIFIED: DType
UINT8: DType
FLOAT32: DType
LAYOUT_UNSPECIFIED: Layout
NHWC: Layout
NCHW: Layout
JOB_STATE_UNSPECIFIED: JobState
QUEUED: JobState
RUNNING: JobState
PROMOTED: JobState
REJECTED: JobState
FAILED: JobState
CANCELLED: JobState
INTERRUPTED: JobState

class RawImages(_message.Message):
    __slots__ = ("data", "dtype", "layout", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: DType
    layout: Layout
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ..., layout: _Optional[_Union[Layout, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class EncodedImages(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("raw", "encoded", "top_k", "version")
    RAW_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    raw: RawImages
    encoded: EncodedImages
    top_k: int
    version: int
    def __init__(self, raw: _Optional[_Union[RawImages, _Mapping]] = ..., encoded: _Optional[_Union[EncodedImages, _Mapping]] = ..., top_k: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class TopK(_message.Message):
    __slots__ = ("class_index", "probability")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    class_index: _containers.RepeatedScalarFieldContainer[int]
    probability: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, class_index: _Optional[_Iterable[int]] = ..., probability: _Optional[_Iterable[float]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model_version", "class_names", "probabilities", "shape", "predicted_class", "predicted_name", "top_k")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_CLASS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_NAME_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    probabilities: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    predicted_class: _containers.RepeatedScalarFieldContainer[int]
    predicted_name: _containers.RepeatedScalarFieldContainer[str]
    top_k: _containers.RepeatedCompositeFieldContainer[TopK]
    def __init__(self, model_version: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., probabilities: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., predicted_class: _Optional[_Iterable[int]] = ..., predicted_name: _Optional[_Iterable[str]] = ..., top_k: _Optional[_Iterable[_Union[TopK, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "promoted_version")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    promoted_version: int
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., promoted_version: _Optional[int] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("name", "dtype", "layout", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    layout: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., layout: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class GateDecision(_message.Message):
    __slots__ = ("promoted", "reason", "reasons", "candidate_accuracy", "required_accuracy", "champion_version", "champion_accuracy", "parity_passed")
    PROMOTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CHAMPION_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHAMPION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PARITY_PASSED_FIELD_NUMBER: _ClassVar[int]
    promoted: bool
    reason: str
    reasons: _containers.RepeatedScalarFieldContainer[str]
    candidate_accuracy: float
    required_accuracy: float
    champion_version: int
    champion_accuracy: float
    parity_passed: bool
    def __init__(self, promoted: _Optional[bool] = ..., reason: _Optional[str] = ..., reasons: _Optional[_Iterable[str]] = ..., candidate_accuracy: _Optional[float] = ..., required_accuracy: _Optional[float] = ..., champion_version: _Optional[int] = ..., champion_accuracy: _Optional[float] = ..., parity_passed: _Optional[bool] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("version", "classes", "input", "val_accuracy", "dataset", "gate", "created_at", "promoted_at", "promoted", "sha256", "job_id", "card_json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    VAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_AT_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CARD_JSON_FIELD_NUMBER: _ClassVar[int]
    version: int
    classes: _containers.RepeatedScalarFieldContainer[str]
    input: InputSpec
    val_accuracy: float
    dataset: str
    gate: GateDecision
    created_at: str
    promoted_at: str
    promoted: bool
    sha256: str
    job_id: str
    card_json: str
    def __init__(self, version: _Optional[int] = ..., classes: _Optional[_Iterable[str]] = ..., input: _Optional[_Union[InputSpec, _Mapping]] = ..., val_accuracy: _Optional[float] = ..., dataset: _Optional[str] = ..., gate: _Optional[_Union[GateDecision, _Mapping]] = ..., created_at: _Optional[str] = ..., promoted_at: _Optional[str] = ..., promoted: _Optional[bool] = ..., sha256: _Optional[str] = ..., job_id: _Optional[str] = ..., card_json: _Optional[str] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("version", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: int
    reason: str
    def __init__(self, version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class GateOverrides(_message.Message):
    __slots__ = ("min_accuracy", "min_improvement", "max_class_recall_drop", "allow_class_change")
    MIN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MIN_IMPROVEMENT_FIELD_NUMBER: _ClassVar[int]
    MAX_CLASS_RECALL_DROP_FIELD_NUMBER: _ClassVar[int]
    ALLOW_CLASS_CHANGE_FIELD_NUMBER: _ClassVar[int]
    min_accuracy: float
    min_improvement: float
    max_class_recall_drop: float
    allow_class_change: bool
    def __init__(self, min_accuracy: _Optional[float] = ..., min_improvement: _Optional[float] = ..., max_class_recall_drop: _Optional[float] = ..., allow_class_change: _Optional[bool] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("dataset", "epochs", "batch_size", "lr", "seed", "val_fraction", "gate", "idempotency_key", "augment", "schedule", "label_smoothing", "weight_decay", "resume_job")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    VAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    AUGMENT_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    LABEL_SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    RESUME_JOB_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    epochs: int
    batch_size: int
    lr: float
    seed: int
    val_fraction: float
    gate: GateOverrides
    idempotency_key: str
    augment: str
    schedule: str
    label_smoothing: float
    weight_decay: float
    resume_job: str
    def __init__(self, dataset: _Optional[str] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., seed: _Optional[int] = ..., val_fraction: _Optional[float] = ..., gate: _Optional[_Union[GateOverrides, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., augment: _Optional[str] = ..., schedule: _Optional[str] = ..., label_smoothing: _Optional[float] = ..., weight_decay: _Optional[float] = ..., resume_job: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "state", "request", "created_at", "started_at", "finished_at", "error", "model_version", "gate", "epoch", "val_accuracy", "queue_position", "attempts")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    VAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: JobState
    request: TrainRequest
    created_at: str
    started_at: str
    finished_at: str
    error: str
    model_version: int
    gate: GateDecision
    epoch: int
    val_accuracy: float
    queue_position: int
    attempts: _containers.RepeatedCompositeFieldContainer[JobAttempt]
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., request: _Optional[_Union[TrainRequest, _Mapping]] = ..., created_at: _Optional[str] = ..., started_at: _Optional[str] = ..., finished_at: _Optional[str] = ..., error: _Optional[str] = ..., model_version: _Optional[int] = ..., gate: _Optional[_Union[GateDecision, _Mapping]] = ..., epoch: _Optional[int] = ..., val_accuracy: _Optional[float] = ..., queue_position: _Optional[int] = ..., attempts: _Optional[_Iterable[_Union[JobAttempt, _Mapping]]] = ...) -> None: ...

class JobAttempt(_message.Message):
    __slots__ = ("number", "trainer", "claimed_at", "ended_at", "outcome")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    TRAINER_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    number: int
    trainer: str
    claimed_at: str
    ended_at: str
    outcome: str
    def __init__(self, number: _Optional[int] = ..., trainer: _Optional[str] = ..., claimed_at: _Optional[str] = ..., ended_at: _Optional[str] = ..., outcome: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("id", "after_sequence")
    ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    after_sequence: int
    def __init__(self, id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("sequence", "time", "type", "state", "epoch", "epochs", "step", "steps", "images_per_s", "eta_s", "metrics", "gate", "message", "json")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_PER_S_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time: str
    type: str
    state: JobState
    epoch: int
    epochs: int
    step: int
    steps: int
    images_per_s: float
    eta_s: float
    metrics: _containers.ScalarMap[str, float]
    gate: GateDecision
    message: str
    json: str
    def __init__(self, sequence: _Optional[int] = ..., time: _Optional[str] = ..., type: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., epoch: _Optional[int] = ..., epochs: _Optional[int] = ..., step: _Optional[int] = ..., steps: _Optional[int] = ..., images_per_s: _Optional[float] = ..., eta_s: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., gate: _Optional[_Union[GateDecision, _Mapping]] = ..., message: _Optional[str] = ..., json: _Optional[str] = ...) -> None: ...
