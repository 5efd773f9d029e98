"""RunConfig: every training setting of a run, and its conversion to and from the signed manifest.

`protocol/` must not import `peer/`, so the manifest proto knows nothing of the peer's dataclasses; this
module is the one bridge. The contract: `RunConfig.from_manifest(c.to_manifest(swarm)) == c` for every
valid config, and every field of ModelConfig, SliceConfig, InnerConfig, OuterConfig and CodecConfig has a
manifest field (a test walks the dataclass fields to keep it so).

A run config comes from flags or a TOML file with the sections below (all optional but `swarm`):

    swarm = "tinystories-tiny"      method = "gossip-ppu"      preset = "tiny"
    [model]   any ModelConfig field, overriding the preset
    [slices]  num_slices, cut       [inner] InnerConfig fields (betas = [0.9, 0.95])
    [outer]   OuterConfig fields (default: the method's tuned settings) and clip
    [gossip]  fanout, exchange_timeout_s, min_round_s      [codec] name, block_size, topk_fraction,
                                                                   chunk_size, feedback_decay
    [data]    source, tokenizer, seed; or location (a prepared dataset's URL or folder: create-run --data)
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from peer.core.inner import InnerConfig
from peer.core.model import PRESETS, ModelConfig, preset
from peer.core.outer import DEFAULT_OUTER, OuterConfig
from peer.core.slices import SliceConfig
from protocol import PROTOCOL_VERSION
from protocol._generated import murmur_pb2 as pb
from protocol.codec import CodecConfig
from protocol.errors import SetupError
from protocol.limits import DEFAULT_MIN_ROUND_S

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib



def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file as a dict: the one reader of run configs and `murmur run --config` files. SetupError (a
    ValueError) names the file and what is wrong with it (unreadable, or not TOML and where)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise SetupError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SetupError(f"{path} is not valid TOML: {exc}") from exc


RUN_METHODS = ("gossip-ppu", "gossip-ppu-noloco", "gossip-ppu-gasloc")


@dataclass(frozen=True, kw_only=True, slots=True)
class GossipConfig:
    """Partner selection over the network."""

    fanout: int = 2
    """Partners per round (DESIGN.md: prefer >= 2 so clipping can do its job)."""
    exchange_timeout_s: float = 60.0
    """An exchange slower than this is skipped."""
    min_round_s: float = DEFAULT_MIN_ROUND_S
    """The shortest round an honest peer of this run makes: its rounds start at least this far apart (a faster
    peer waits out the rest: peer/node/waits.Pacer). Servers admit twice one push per this many seconds
    from each peer (protocol/limits.py) and ban a peer over it: a run whose rounds take minutes sets it high,
    so that a flooder is cut off after a few calls instead of hundreds."""

    def __post_init__(self) -> None:
        if self.fanout < 1 or not self.exchange_timeout_s > 0:
            raise ValueError("gossip fanout must be >= 1 and exchange_timeout_s > 0")
        if not 0 < self.min_round_s <= 3600:
            raise ValueError(f"gossip min_round_s must be in (0, 3600] seconds, got {self.min_round_s}")


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """Where tokens come from: the embedded corpus with byte tokens by default, or a prepared dataset
    (`murmur prepare-data`) at `location`, which every peer fetches and checks against `dataset_id`."""

    source: str = "embedded"
    """"embedded", or a local text/jsonl path every peer has a copy of (ignored when `location` is set)."""
    tokenizer: str = "bytes"
    """"bytes", or the SHA-256 of the tokenizer.json every peer must have."""
    seed: int = 0
    location: str = ""
    """A prepared dataset's folder: an http(s):// or file:// URL, or a local path; "" for `source` data."""
    dataset_id: str = ""
    """SHA-256 of that dataset's index.json (`murmur create-run --data` computes it)."""

    def __post_init__(self) -> None:
        if bool(self.location) != bool(self.dataset_id):
            raise ValueError("[data] location and dataset_id go together; give `murmur create-run --data` the "
                             "dataset's URL or folder and it computes the id")  # fmt: skip
        if self.dataset_id and not (len(self.dataset_id) == 64 and all(c in "0123456789abcdef" for c in
                                                                         self.dataset_id)):  # fmt: skip
            raise ValueError(f"[data] dataset_id must be a SHA-256 in hex, got {self.dataset_id!r}")

    @property
    def prepared(self) -> bool:
        """Whether the run trains on a prepared dataset (fetched by location) rather than on `source`."""
        return bool(self.dataset_id)


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """Everything identical across a swarm; what the manifest signs."""

    swarm: str
    method: str = "gossip-ppu"
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=lambda: PRESETS["tiny"])
    dtype: str = "float32"
    slices: SliceConfig = field(default_factory=SliceConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=lambda: DEFAULT_OUTER["gossip-ppu"])
    clip: float = 0.0
    """Clipping bound of partner terms; 0 = a running percentile of the peer's own norms."""
    gossip: GossipConfig = field(default_factory=GossipConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        if self.method not in RUN_METHODS:
            raise ValueError(f"unknown run method {self.method!r}; choose one of {', '.join(RUN_METHODS)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.clip < 0:
            raise ValueError("clip must be >= 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from the TOML layout of the module docstring; unknown keys raise ValueError."""
        data = dict(data)
        top = {k: data.pop(k) for k in ("swarm", "method", "preset", "dtype") if k in data}
        if "swarm" not in top:
            raise ValueError('a run config needs `swarm = "name"`')
        method = top.get("method", "gossip-ppu")
        outer = dict(data.pop("outer", {}))
        clip = float(outer.pop("clip", 0.0))
        inner = dict(data.pop("inner", {}))
        if "betas" in inner:
            inner["betas"] = tuple(inner["betas"])
        sections = {
            "model": preset(top.get("preset", "tiny"), **data.pop("model", {})),
            "slices": _make(SliceConfig, data.pop("slices", {})),
            "inner": _make(InnerConfig, inner),
            "outer": replace(DEFAULT_OUTER.get(method, OuterConfig()), **outer),
            "gossip": _make(GossipConfig, data.pop("gossip", {})),
            "codec": _make(CodecConfig, data.pop("codec", {})),
            "data": _make(DataConfig, data.pop("data", {})),
        }
        if data:
            raise ValueError(f"unknown run config sections: {sorted(data)}")
        return cls(**top, clip=clip, **sections)

    @classmethod
    def from_toml(cls, path: Path) -> RunConfig:
        return cls.from_dict(read_toml(path))

    def to_manifest(self, created_unix: int | None = None) -> pb.Manifest:
        """The Manifest proto carrying every field of this config."""
        m, i, o = self.model, self.inner, self.outer
        return pb.Manifest(
            swarm_name=self.swarm,
            protocol_version=PROTOCOL_VERSION,
            model=pb.ModelSpec(
                preset=self.preset,
                vocab_size=m.vocab_size,
                d_model=m.d_model,
                n_layers=m.n_layers,
                n_heads=m.n_heads,
                seq_len=m.seq_len,
                dtype=self.dtype,
                mlp=m.mlp,
                d_hidden=m.d_hidden,
                positions=m.positions,
                tie_embeddings=m.tie_embeddings,
                norm_eps=m.norm_eps,
                init_std=m.init_std,
            ),  # fmt: skip
            slices=pb.SliceSpec(
                num_slices=self.slices.num_slices, cut=self.slices.cut, shared_head=self.slices.shared_head
            ),
            inner=pb.InnerSpec(
                steps_per_round=i.steps_per_round,
                lr=i.lr,
                beta1=i.betas[0],
                beta2=i.betas[1],
                weight_decay=i.weight_decay,
                warmup_steps=i.warmup_steps,
                schedule="cosine",
                batch_size=i.batch_size,
                total_steps=i.total_steps,
                min_lr_ratio=i.min_lr_ratio,
                grad_clip=i.grad_clip,
                grad_accum=i.grad_accum,
                rest_step=i.rest_step,
            ),  # fmt: skip
            outer=pb.OuterSpec(
                method=self.method, lr=o.lr, momentum=o.momentum, clip=self.clip, rule=o.rule, consensus=o.consensus
            ),  # fmt: skip
            gossip=pb.GossipSpec(fanout=self.gossip.fanout, exchange_timeout_s=self.gossip.exchange_timeout_s,
                                 min_round_s=self.gossip.min_round_s),  # fmt: skip
            codec=pb.CodecSpec(
                name=self.codec.name, block_size=self.codec.block_size, topk_fraction=self.codec.topk_fraction,
                chunk_size=self.codec.chunk_size, feedback_decay=self.codec.feedback_decay,
            ),  # fmt: skip
            data=pb.DataSpec(source=self.data.source, tokenizer=self.data.tokenizer, seed=self.data.seed,
                             location=self.data.location, dataset_id=self.data.dataset_id),
            created_unix=int(time.time()) if created_unix is None else created_unix,
        )

    @classmethod
    def from_manifest(cls, manifest: pb.Manifest) -> RunConfig:
        """The config a verified manifest describes; ValueError if a value is out of range."""
        ms, i, o = manifest.model, manifest.inner, manifest.outer
        if i.schedule not in ("cosine", ""):
            raise ValueError(f"this murmur only knows the cosine schedule, the run wants {i.schedule!r}")
        model = ModelConfig(vocab_size=ms.vocab_size, seq_len=ms.seq_len, d_model=ms.d_model, n_layers=ms.n_layers,
                            n_heads=ms.n_heads, mlp=ms.mlp, d_hidden=ms.d_hidden, positions=ms.positions,
                            tie_embeddings=ms.tie_embeddings, norm_eps=ms.norm_eps, init_std=ms.init_std)  # fmt: skip
        inner = InnerConfig(lr=i.lr, betas=(i.beta1, i.beta2), weight_decay=i.weight_decay,
                            warmup_steps=i.warmup_steps, total_steps=i.total_steps, min_lr_ratio=i.min_lr_ratio,
                            grad_clip=i.grad_clip, steps_per_round=i.steps_per_round, batch_size=i.batch_size,
                            grad_accum=i.grad_accum, rest_step=i.rest_step)  # fmt: skip
        return cls(
            swarm=manifest.swarm_name, method=o.method, preset=ms.preset, model=model, dtype=ms.dtype,
            slices=SliceConfig(num_slices=manifest.slices.num_slices, cut=manifest.slices.cut,
                               shared_head=manifest.slices.shared_head), inner=inner,
            outer=OuterConfig(rule=o.rule, lr=o.lr, momentum=o.momentum, consensus=o.consensus), clip=o.clip,
            gossip=GossipConfig(fanout=manifest.gossip.fanout, exchange_timeout_s=manifest.gossip.exchange_timeout_s,
                                min_round_s=manifest.gossip.min_round_s or DEFAULT_MIN_ROUND_S),
            codec=_codec_from(manifest.codec),
            data=DataConfig(source=manifest.data.source, tokenizer=manifest.data.tokenizer, seed=manifest.data.seed,
                            location=manifest.data.location, dataset_id=manifest.data.dataset_id),
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (for logs and checkpoint headers)."""
        return asdict(self)


def _make(cls: type, section: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(section) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**section)


def _codec_from(spec: pb.CodecSpec) -> CodecConfig:
    """The codec of a manifest; fields a manifest from before them lacks (0 / absent) take their defaults."""
    defaults = CodecConfig()
    return CodecConfig(name=spec.name, block_size=spec.block_size, topk_fraction=spec.topk_fraction,
                       chunk_size=spec.chunk_size or defaults.chunk_size,
                       feedback_decay=spec.feedback_decay if spec.HasField("feedback_decay") else 1.0)  # fmt: skip
