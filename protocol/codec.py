"""Tensors <-> bytes for the wire: fp32, bf16, blockwise int8/int4, top-k, sparseloco, and error feedback.

Never pickle, never torch.load: an `Encoded` carries its codec, the original dtype name and the shape
explicitly, and the payload is plain little-endian numbers laid out as below (no header; the
metadata travels in the proto fields beside the bytes).

    fp32  numel float32
    bf16  numel bfloat16
    int8  nblocks float32 scales | numel int8            q in [-127, 127], x ~ q * scale
    int4  nblocks float32 scales | ceil(numel/2) bytes   two values per byte, low nibble first,
                                                         stored as q + 8 with q in [-7, 7]
    topk  nblocks(k) float32 scales | k indices | k int8 values, indices strictly increasing;
          index width 2 bytes (uint16) when numel <= 2**16, 4 (int32) up to 2**31, else 8 (int64)
    sparseloco  chunked top-k at 2 bits per value: layout in protocol/lowbit.py
    sign  nblocks float32 scales (mean |x|) | ceil(numel/8) bytes of sign bits: layout in protocol/lowbit.py

Decoders clamp q to [-127, 127] / [-7, 7] and refuse scales with qmax * scale beyond the original
dtype's max (encoders cap theirs there), so no accepted payload decodes to inf. Index width: 2 bytes
covers every tensor of the tiny model and most norm/bias vectors, saving 40% of a topk message.

Scales are float32, not float16: pseudo-gradients are often 1e-6..1e-8 per entry, so absmax/127 falls
below float16's smallest normal (6e-5) and its subnormals (down to 6e-8) and would flush whole blocks
to zero; the cost is 4 bytes per 256 values (1.6%) instead of 2 (0.8%). Scales come first so that
every multi-byte field starts 4-byte aligned.

`decode` validates everything it can from the lengths and metadata before it allocates anything the
size of the tensor, because the bytes come from strangers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from protocol.errors import MalformedPayload, Reason, RejectedUpdate
from protocol.lowbit import decode_sign, decode_sparse, encode_sign, encode_sparse, sign_size, sparse_size
from protocol.quantize import ceil_div, dequantize, largest, pack_nibbles, quantize, scale_limit, within

CODEC_NAMES = ("fp32", "bf16", "int8", "int4", "topk", "sparseloco", "sign")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

MAX_NDIM = 32
# Hard ceiling on any tensor we will decode (64 GiB as float32), whatever max_numel says.
MAX_NUMEL = 2**34

_QMAX = {"int8": 127, "int4": 7, "topk": 127}
_SCALE_BYTES = 4


@dataclass(frozen=True, kw_only=True, slots=True)
class CodecConfig:
    """How a run's tensors are compressed; part of the manifest, so both sides agree on it."""

    name: str = "int8"
    """One of CODEC_NAMES."""
    block_size: int = 256
    """Values per scale for int8/int4/sign, and for the int8 values topk keeps."""
    topk_fraction: float = 0.01
    """Share of entries topk keeps: k = max(1, ceil(fraction * numel)), fraction read as written; sparseloco
    keeps this share of every chunk."""
    chunk_size: int = 4096
    """Values per sparseloco chunk (SparseLoCo's 64 x 64); at most 2**16, so an in-chunk index fits 2 bytes."""
    feedback_decay: float = 1.0
    """beta of error feedback: what the codec dropped is carried into the next round times beta. 1 is plain
    error feedback; SparseLoCo's beta < 1 makes the buffer its outer momentum (e = beta*e + delta; send
    compress(e); e -= what was sent), so its outer rule needs no momentum of its own."""

    def __post_init__(self) -> None:
        if self.name not in CODEC_NAMES:
            raise ValueError(f"unknown codec {self.name!r}; expected one of {CODEC_NAMES}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise ValueError(f"block_size must be an int, got {self.block_size!r}")
        if not 1 <= self.block_size <= 2**20:
            raise ValueError(f"block_size must be in [1, 2**20], got {self.block_size}")
        fraction = self.topk_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise ValueError(f"topk_fraction must be a number, got {fraction!r}")
        if not (math.isfinite(fraction) and 0 < fraction <= 1):
            raise ValueError(f"topk_fraction must be in (0, 1], got {fraction}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int):
            raise ValueError(f"chunk_size must be an int, got {self.chunk_size!r}")
        if not 1 <= self.chunk_size <= 2**16:
            raise ValueError(f"chunk_size must be in [1, 2**16], got {self.chunk_size}")
        decay = self.feedback_decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay <= 1:
            raise ValueError(f"feedback_decay must be a number in [0, 1], got {decay!r}")


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tensor as it crosses the wire."""

    codec: str
    dtype: str
    """Original torch dtype name: "float32", "bfloat16" or "float16"; decode returns this dtype."""
    shape: tuple[int, ...]
    payload: bytes


def topk_count(numel: int, fraction: float) -> int:
    """Entries topk keeps. The fraction is read as its decimal repr so 0.07 * 100 keeps 7, not 8."""
    if numel == 0:
        return 0
    return min(numel, max(1, math.ceil(Fraction(repr(float(fraction))) * numel)))


def index_width(numel: int) -> int:
    """Bytes per topk index: the smallest of 2/4/8 that can address every entry."""
    if numel <= 2**16:
        return 2
    return 4 if numel <= 2**31 else 8


_INDEX_DTYPES = {2: torch.uint16, 4: torch.int32, 8: torch.int64}


def payload_size(shape: tuple[int, ...], config: CodecConfig) -> int:
    """Exact len(payload) that encode produces for this shape; decode insists on it."""
    numel = math.prod(shape)
    name, block = config.name, config.block_size
    if name == "fp32":
        return 4 * numel
    if name == "bf16":
        return 2 * numel
    if name == "int8":
        return _SCALE_BYTES * ceil_div(numel, block) + numel
    if name == "int4":
        return _SCALE_BYTES * ceil_div(numel, block) + ceil_div(numel, 2)
    if name == "sparseloco":
        return sparse_size(numel, config.chunk_size, lambda n: topk_count(n, config.topk_fraction))
    if name == "sign":
        return sign_size(numel, block)
    k = topk_count(numel, config.topk_fraction)
    return _SCALE_BYTES * ceil_div(k, block) + k * index_width(numel) + k



# ---------------------------------------------------------------------------------------- encode


def encode(tensor: torch.Tensor, config: CodecConfig) -> Encoded:
    """Compress a floating tensor on any device; raises ValueError if it holds NaN/inf (never sent)."""
    dtype_name = _dtype_name(tensor.dtype)
    shape = tuple(int(d) for d in tensor.shape)
    flat = tensor.detach().reshape(-1)
    if config.name in ("fp32", "bf16"):
        parts = [flat.to(torch.float32 if config.name == "fp32" else torch.bfloat16)]
        if not within(parts[0], float(torch.finfo(tensor.dtype).max)):
            raise ValueError("refusing to encode NaN/inf, or values the original dtype cannot hold")
    elif config.name in ("int8", "int4"):
        parts = _encode_blockwise(flat.float(), config, tensor.dtype)
    elif config.name == "sparseloco":
        count = lambda n: topk_count(n, config.topk_fraction)  # noqa: E731
        parts = encode_sparse(flat.float(), config.chunk_size, count, float(torch.finfo(tensor.dtype).max))
    elif config.name == "sign":
        parts = encode_sign(flat.float(), config.block_size, float(torch.finfo(tensor.dtype).max))
    else:
        parts = _encode_topk(flat.float(), config, tensor.dtype)
    payload = b"".join(_to_bytes(p) for p in parts)
    return Encoded(codec=config.name, dtype=dtype_name, shape=shape, payload=payload)


def _dtype_name(dtype: torch.dtype) -> str:
    names = {candidate: name for name, candidate in DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"cannot encode dtype {dtype}; expected one of {tuple(DTYPES)}")
    return names[dtype]


def _to_bytes(t: torch.Tensor) -> bytes:
    """Payload bytes in host memory; from CUDA through pinned memory (several times faster)."""
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        t = host.copy_(t)
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _encode_blockwise(x: torch.Tensor, config: CodecConfig, dtype: torch.dtype) -> list[torch.Tensor]:
    """Quantise straight into the payload buffer, so the only copy left is the final tobytes."""
    name, numel = config.name, x.numel()
    out = torch.empty(payload_size((numel,), config), dtype=torch.uint8, device=x.device)
    scale_bytes = _SCALE_BYTES * ceil_div(numel, config.block_size)
    if name == "int8":
        q = out[scale_bytes:].view(torch.int8)
    else:
        q = torch.empty(numel, dtype=torch.int8, device=x.device)
    scales = quantize(x, config.block_size, _QMAX[name], scale_limit(_QMAX[name], dtype), q)
    out[:scale_bytes].view(torch.float32).copy_(scales)
    if name == "int4":
        pack_nibbles(q, out[scale_bytes:])
    return [out]


def _encode_topk(x: torch.Tensor, config: CodecConfig, dtype: torch.dtype) -> list[torch.Tensor]:
    numel = x.numel()
    k = topk_count(numel, config.topk_fraction)
    if k == 0:
        return []
    magnitude = x.abs()
    if not math.isfinite(float(magnitude.max())):
        raise ValueError("refusing to encode a tensor with NaN or inf")
    indices = largest(magnitude, k)
    del magnitude
    q = torch.empty(k, dtype=torch.int8, device=x.device)
    scales = quantize(x[indices], config.block_size, 127, scale_limit(127, dtype), q)
    return [scales, indices.to(_INDEX_DTYPES[index_width(numel)]), q]


# ---------------------------------------------------------------------------------------- decode


def decode(
    encoded: Encoded,
    config: CodecConfig,
    *,
    expected_shape: tuple[int, ...] | None = None,
    expected_dtype: str | None = None,
    max_numel: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Bytes from a stranger -> tensor of the original dtype and shape on `device`.

    Raises MalformedPayload (GARBAGE: wrong codec, bad length, bad indices; OVERSIZE: too many
    elements) or RejectedUpdate (WRONG_SHAPE, WRONG_DTYPE, NON_FINITE). Nothing the size of the
    tensor is allocated before the metadata and the payload length have been checked.
    """
    dtype = _check_metadata(encoded, config, expected_shape, expected_dtype, max_numel)
    numel = math.prod(encoded.shape)
    payload = encoded.payload
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise MalformedPayload(Reason.GARBAGE, f"payload is {type(payload).__name__}, not bytes")
    expected_len = payload_size(encoded.shape, config)
    if len(payload) != expected_len:
        detail = f"payload is {len(payload)} bytes, {config.name} {encoded.shape} needs {expected_len}"
        raise MalformedPayload(Reason.GARBAGE, detail)
    reader = _Reader(bytearray(payload), torch.device(device))
    if config.name in ("fp32", "bf16"):
        flat = reader.take(torch.float32 if config.name == "fp32" else torch.bfloat16, numel)
        if not within(flat, float(torch.finfo(dtype).max)):
            raise RejectedUpdate(Reason.NON_FINITE, f"payload holds NaN, inf or values beyond {encoded.dtype}")
    elif config.name in ("int8", "int4"):
        flat = _decode_blockwise(reader, numel, config, dtype)
    elif config.name == "sparseloco":
        count = lambda n: topk_count(n, config.topk_fraction)  # noqa: E731
        flat = decode_sparse(reader.take, numel, config.chunk_size, count, float(torch.finfo(dtype).max))
    elif config.name == "sign":
        flat = decode_sign(reader.take, numel, config.block_size, float(torch.finfo(dtype).max))
    else:
        flat = _decode_topk(reader, numel, config, dtype)
    return flat.to(dtype).reshape(encoded.shape)


def _check_metadata(
    encoded: Encoded, config: CodecConfig, expected_shape: tuple[int, ...] | None,
    expected_dtype: str | None, max_numel: int | None,
) -> torch.dtype:
    """Everything that can be checked without reading the payload; returns the torch dtype."""
    if encoded.codec != config.name:
        raise MalformedPayload(Reason.GARBAGE, f"codec {encoded.codec!r}, the run uses {config.name!r}")
    if not isinstance(encoded.dtype, str) or encoded.dtype not in DTYPES:
        raise RejectedUpdate(Reason.WRONG_DTYPE, f"dtype {encoded.dtype!r} is not one of {tuple(DTYPES)}")
    if expected_dtype is not None and encoded.dtype != expected_dtype:
        raise RejectedUpdate(Reason.WRONG_DTYPE, f"dtype {encoded.dtype}, expected {expected_dtype}")
    shape = encoded.shape
    if not isinstance(shape, tuple) or len(shape) > MAX_NDIM:
        raise MalformedPayload(Reason.GARBAGE, f"shape must be a tuple of at most {MAX_NDIM} dims")
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise MalformedPayload(Reason.GARBAGE, f"shape {shape!r} must hold non-negative ints")
    if expected_shape is not None and shape != tuple(expected_shape):
        raise RejectedUpdate(Reason.WRONG_SHAPE, f"shape {shape}, expected {tuple(expected_shape)}")
    ceiling = MAX_NUMEL if max_numel is None else min(max_numel, MAX_NUMEL)
    numel = math.prod(shape)  # Python ints: exact however absurd the dims are
    if numel > ceiling:
        raise MalformedPayload(Reason.OVERSIZE, f"{numel} elements, at most {ceiling} allowed")
    return DTYPES[encoded.dtype]


class _Reader:
    """Consecutive typed fields of a payload whose total length was already checked."""

    def __init__(self, buffer: bytearray, device: torch.device) -> None:
        self.buffer = buffer
        self.device = device
        self.offset = 0

    def take(self, dtype: torch.dtype, count: int) -> torch.Tensor:
        if count == 0:
            return torch.empty(0, dtype=dtype, device=self.device)
        out = torch.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.offset)
        self.offset += count * out.element_size()
        if self.device.type == "cuda":
            out = out.pin_memory()  # pageable host-to-device copies are several times slower
        return out.to(self.device)


def _take_scales(reader: _Reader, count: int, name: str, dtype: torch.dtype) -> torch.Tensor:
    scales = reader.take(torch.float32, count)
    if not within(scales, scale_limit(_QMAX[name], dtype)):
        raise RejectedUpdate(Reason.NON_FINITE, f"a scale is NaN, inf or would overflow {dtype}")
    return scales


def _decode_blockwise(reader: _Reader, numel: int, config: CodecConfig, dtype: torch.dtype) -> torch.Tensor:
    scales = _take_scales(reader, ceil_div(numel, config.block_size), config.name, dtype)
    if config.name == "int8":
        return dequantize(reader.take(torch.int8, numel), scales, config.block_size, 127)
    packed = reader.take(torch.uint8, ceil_div(numel, 2))
    values = torch.empty(numel, dtype=torch.float32, device=reader.device)
    values[0::2] = packed & 15
    values[1::2] = packed[: numel // 2] >> 4
    return dequantize(values.sub_(8), scales, config.block_size, 7)


def _decode_topk(reader: _Reader, numel: int, config: CodecConfig, dtype: torch.dtype) -> torch.Tensor:
    k = topk_count(numel, config.topk_fraction)
    scales = _take_scales(reader, ceil_div(k, config.block_size), "topk", dtype)
    indices = reader.take(_INDEX_DTYPES[index_width(numel)], k).to(torch.int64)
    if k:
        if int(indices.min()) < 0 or int(indices.max()) >= numel:
            raise MalformedPayload(Reason.GARBAGE, f"topk index out of range for {numel} elements")
        if k > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise MalformedPayload(Reason.GARBAGE, "topk indices must be strictly increasing")
    values = dequantize(reader.take(torch.int8, k), scales, config.block_size, 127)
    out = torch.zeros(numel, dtype=torch.float32, device=reader.device)
    out[indices] = values
    return out


# ---------------------------------------------------------------------------------------- error feedback


class ErrorFeedback:
    """Carries what the codec dropped into the next round, per named tensor.

    Lossy codecs are unbiased only over time: whatever this round's message could not carry is added
    to the same tensor's next message, so the sum of what partners receive tracks the sum of what we
    meant to send (the residual stays bounded instead of the error accumulating).
    """

    def __init__(self, config: CodecConfig) -> None:
        self.config = config
        self._residuals: dict[str, torch.Tensor] = {}

    def encode(self, name: str, tensor: torch.Tensor) -> Encoded:
        """encode(tensor + residual); the new residual is exactly what the receiver did not get.

        A residual whose shape no longer matches (the tensor was re-cut) is dropped; on ValueError
        (non-finite input) the stored residual is left as it was.
        """
        corrected = tensor.detach().float()
        residual = self._residuals.get(name)
        if residual is not None and residual.shape == corrected.shape:
            corrected = corrected + self.config.feedback_decay * residual.to(corrected.device)
        encoded = encode(corrected.to(tensor.dtype), self.config)
        received = decode(encoded, self.config, device=corrected.device).float()
        self._residuals[name] = corrected - received
        return encoded

    def state_dict(self) -> dict[str, torch.Tensor]:
        """float32 residuals by name, detached copies (safe to save with safetensors)."""
        return {name: r.detach().clone() for name, r in self._residuals.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace all residuals; refuses non-float or non-finite tensors (a corrupt checkpoint)."""
        loaded = {}
        for name, r in state.items():
            if not r.is_floating_point() or not bool(torch.isfinite(r).all()):
                raise ValueError(f"residual {name!r} must be a finite floating tensor")
            loaded[name] = r.detach().float().clone()
        self._residuals = loaded
