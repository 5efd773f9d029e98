from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelSpec(_message.Message):
    __slots__ = ("preset", "vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "dtype", "mlp", "d_hidden", "positions", "tie_embeddings", "norm_eps", "init_std")
    PRESET_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    N_HEADS_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MLP_FIELD_NUMBER: _ClassVar[int]
    D_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    TIE_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    NORM_EPS_FIELD_NUMBER: _ClassVar[int]
    INIT_STD_FIELD_NUMBER: _ClassVar[int]
    preset: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int
    dtype: str
    mlp: str
    d_hidden: int
    positions: str
    tie_embeddings: bool
    norm_eps: float
    init_std: float
    def __init__(self, preset: _Optional[str] = ..., vocab_size: _Optional[int] = ..., d_model: _Optional[int] = ..., n_layers: _Optional[int] = ..., n_heads: _Optional[int] = ..., seq_len: _Optional[int] = ..., dtype: _Optional[str] = ..., mlp: _Optional[str] = ..., d_hidden: _Optional[int] = ..., positions: _Optional[str] = ..., tie_embeddings: _Optional[bool] = ..., norm_eps: _Optional[float] = ..., init_std: _Optional[float] = ...) -> None: ...

class SliceSpec(_message.Message):
    __slots__ = ("num_slices", "cut", "shared_head")
    NUM_SLICES_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    SHARED_HEAD_FIELD_NUMBER: _ClassVar[int]
    num_slices: int
    cut: str
    shared_head: bool
    def __init__(self, num_slices: _Optional[int] = ..., cut: _Optional[str] = ..., shared_head: _Optional[bool] = ...) -> None: ...

class InnerSpec(_message.Message):
    __slots__ = ("steps_per_round", "lr", "beta1", "beta2", "weight_decay", "warmup_steps", "schedule", "batch_size", "total_steps", "min_lr_ratio", "grad_clip", "grad_accum", "rest_step")
    STEPS_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_RATIO_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_FIELD_NUMBER: _ClassVar[int]
    GRAD_ACCUM_FIELD_NUMBER: _ClassVar[int]
    REST_STEP_FIELD_NUMBER: _ClassVar[int]
    steps_per_round: int
    lr: float
    beta1: float
    beta2: float
    weight_decay: float
    warmup_steps: int
    schedule: str
    batch_size: int
    total_steps: int
    min_lr_ratio: float
    grad_clip: float
    grad_accum: int
    rest_step: float
    def __init__(self, steps_per_round: _Optional[int] = ..., lr: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., weight_decay: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., schedule: _Optional[str] = ..., batch_size: _Optional[int] = ..., total_steps: _Optional[int] = ..., min_lr_ratio: _Optional[float] = ..., grad_clip: _Optional[float] = ..., grad_accum: _Optional[int] = ..., rest_step: _Optional[float] = ...) -> None: ...

class OuterSpec(_message.Message):
    __slots__ = ("method", "lr", "momentum", "clip", "rule", "consensus")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    CONSENSUS_FIELD_NUMBER: _ClassVar[int]
    method: str
    lr: float
    momentum: float
    clip: float
    rule: str
    consensus: float
    def __init__(self, method: _Optional[str] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., clip: _Optional[float] = ..., rule: _Optional[str] = ..., consensus: _Optional[float] = ...) -> None: ...

class GossipSpec(_message.Message):
    __slots__ = ("fanout", "exchange_timeout_s", "min_round_s")
    FANOUT_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MIN_ROUND_S_FIELD_NUMBER: _ClassVar[int]
    fanout: int
    exchange_timeout_s: float
    min_round_s: float
    def __init__(self, fanout: _Optional[int] = ..., exchange_timeout_s: _Optional[float] = ..., min_round_s: _Optional[float] = ...) -> None: ...

class CodecSpec(_message.Message):
    __slots__ = ("name", "block_size", "topk_fraction", "chunk_size", "feedback_decay")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOPK_FRACTION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_DECAY_FIELD_NUMBER: _ClassVar[int]
    name: str
    block_size: int
    topk_fraction: float
    chunk_size: int
    feedback_decay: float
    def __init__(self, name: _Optional[str] = ..., block_size: _Optional[int] = ..., topk_fraction: _Optional[float] = ..., chunk_size: _Optional[int] = ..., feedback_decay: _Optional[float] = ...) -> None: ...

class DataSpec(_message.Message):
    __slots__ = ("source", "tokenizer", "seed", "location", "dataset_id")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    source: str
    tokenizer: str
    seed: int
    location: str
    dataset_id: str
    def __init__(self, source: _Optional[str] = ..., tokenizer: _Optional[str] = ..., seed: _Optional[int] = ..., location: _Optional[str] = ..., dataset_id: _Optional[str] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("swarm_name", "protocol_version", "model", "slices", "inner", "outer", "gossip", "codec", "data", "created_unix")
    SWARM_NAME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    INNER_FIELD_NUMBER: _ClassVar[int]
    OUTER_FIELD_NUMBER: _ClassVar[int]
    GOSSIP_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    swarm_name: str
    protocol_version: str
    model: ModelSpec
    slices: SliceSpec
    inner: InnerSpec
    outer: OuterSpec
    gossip: GossipSpec
    codec: CodecSpec
    data: DataSpec
    created_unix: int
    def __init__(self, swarm_name: _Optional[str] = ..., protocol_version: _Optional[str] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., slices: _Optional[_Union[SliceSpec, _Mapping]] = ..., inner: _Optional[_Union[InnerSpec, _Mapping]] = ..., outer: _Optional[_Union[OuterSpec, _Mapping]] = ..., gossip: _Optional[_Union[GossipSpec, _Mapping]] = ..., codec: _Optional[_Union[CodecSpec, _Mapping]] = ..., data: _Optional[_Union[DataSpec, _Mapping]] = ..., created_unix: _Optional[int] = ...) -> None: ...

class SignedManifest(_message.Message):
    __slots__ = ("manifest", "owner_public_key", "signature")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    OWNER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    manifest: bytes
    owner_public_key: bytes
    signature: bytes
    def __init__(self, manifest: _Optional[bytes] = ..., owner_public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class PeerAnnouncement(_message.Message):
    __slots__ = ("peer_id", "public_key", "run_id", "endpoint", "tls_fingerprint", "tls_binding", "tls_certificate", "slice", "round", "tokens_per_second", "software_version", "protocol_version", "expires_unix", "loss", "bytes_sent", "bytes_received")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TLS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TLS_BINDING_FIELD_NUMBER: _ClassVar[int]
    TLS_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    public_key: bytes
    run_id: str
    endpoint: str
    tls_fingerprint: str
    tls_binding: bytes
    tls_certificate: bytes
    slice: int
    round: int
    tokens_per_second: float
    software_version: str
    protocol_version: str
    expires_unix: int
    loss: float
    bytes_sent: int
    bytes_received: int
    def __init__(self, peer_id: _Optional[str] = ..., public_key: _Optional[bytes] = ..., run_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., tls_fingerprint: _Optional[str] = ..., tls_binding: _Optional[bytes] = ..., tls_certificate: _Optional[bytes] = ..., slice: _Optional[int] = ..., round: _Optional[int] = ..., tokens_per_second: _Optional[float] = ..., software_version: _Optional[str] = ..., protocol_version: _Optional[str] = ..., expires_unix: _Optional[int] = ..., loss: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class SignedAnnouncement(_message.Message):
    __slots__ = ("announcement", "signature")
    ANNOUNCEMENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    announcement: bytes
    signature: bytes
    def __init__(self, announcement: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class TensorEntry(_message.Message):
    __slots__ = ("name", "codec", "dtype", "shape", "payload_length")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_LENGTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    codec: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    payload_length: int
    def __init__(self, name: _Optional[str] = ..., codec: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., payload_length: _Optional[int] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("protocol_major", "run_id", "round", "slice", "sender", "tensors", "payload_sha256", "signature")
    PROTOCOL_MAJOR_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    protocol_major: int
    run_id: str
    round: int
    slice: int
    sender: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorEntry]
    payload_sha256: bytes
    signature: bytes
    def __init__(self, protocol_major: _Optional[int] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., slice: _Optional[int] = ..., sender: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorEntry, _Mapping]]] = ..., payload_sha256: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class UpdateFrame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class FetchStateRequest(_message.Message):
    __slots__ = ("protocol_major", "run_id")
    PROTOCOL_MAJOR_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_major: int
    run_id: str
    def __init__(self, protocol_major: _Optional[int] = ..., run_id: _Optional[str] = ...) -> None: ...

class StateHeader(_message.Message):
    __slots__ = ("run_id", "round", "sender", "tensors", "content_sha256", "signature")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    sender: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorEntry]
    content_sha256: bytes
    signature: bytes
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., sender: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorEntry, _Mapping]]] = ..., content_sha256: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class StateFrame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: StateHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[StateHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class FetchShardRequest(_message.Message):
    __slots__ = ("protocol_major", "run_id", "sha256", "offset")
    PROTOCOL_MAJOR_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    protocol_major: int
    run_id: str
    sha256: str
    offset: int
    def __init__(self, protocol_major: _Optional[int] = ..., run_id: _Optional[str] = ..., sha256: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class ShardHeader(_message.Message):
    __slots__ = ("total_size", "sha256", "offset")
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    total_size: int
    sha256: str
    offset: int
    def __init__(self, total_size: _Optional[int] = ..., sha256: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class ShardFrame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ShardHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[ShardHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("protocol_major",)
    PROTOCOL_MAJOR_FIELD_NUMBER: _ClassVar[int]
    protocol_major: int
    def __init__(self, protocol_major: _Optional[int] = ...) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("protocol_version", "software_version", "run_id", "round", "slice", "health", "peer_id")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: str
    software_version: str
    run_id: str
    round: int
    slice: int
    health: str
    peer_id: str
    def __init__(self, protocol_version: _Optional[str] = ..., software_version: _Optional[str] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., slice: _Optional[int] = ..., health: _Optional[str] = ..., peer_id: _Optional[str] = ...) -> None: ...

class ObservedAddress(_message.Message):
    __slots__ = ("host",)
    HOST_FIELD_NUMBER: _ClassVar[int]
    host: str
    def __init__(self, host: _Optional[str] = ...) -> None: ...
