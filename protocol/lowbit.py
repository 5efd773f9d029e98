"""The low-bit codecs' payloads (protocol/codec.py): `sparseloco`, chunked top-k at 2 bits per value after
SparseLoCo (arXiv 2508.15706), which keeps 1-3% of each chunk's entries with error feedback; and `sign`, every
value at 1 bit (below).

    sparseloco  nchunks x (low, high) float32 | k uint16 in-chunk indices | ceil(k/4) bytes of 2-bit codes

The tensor is cut into chunks of `chunk_size` consecutive values (the last may be partial); each chunk keeps
k_c = topk_count(len_c, fraction) entries, so k (the sum) follows from the shape alone and a receiver knows
the exact payload length before it reads anything. Indices are positions inside their chunk, strictly
increasing within each chunk, chunk-major; a code's bit 0 is the sign (1: negative) and bit 1 picks the
chunk's high level (value = +-high or +-low), four codes per byte, lowest bits first, the last byte's
padding bits 0. Levels satisfy 0 <= low <= high <= the original dtype's max, so nothing decodes to inf.

What this costs per kept value: 2 bytes of index + 2 bits, against int8 top-k's 2-8 + 1 bytes; a chunk's
two levels (8 bytes) are 1-3% of its message at 1-3% of 4096. Split from codec.py to keep each module short;
codec.py owns the shared checks (codec name, metadata, total length) and calls into this one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from protocol.errors import MalformedPayload, Reason, RejectedUpdate
from protocol.quantize import (
    ceil_div,
    chunk_topk,
    pack_bits,
    pack_crumbs,
    two_levels,
    unpack_bits,
    unpack_crumbs,
    within,
)

LEVEL_BYTES = 8
"""Two float32 magnitudes per chunk."""


def chunk_counts(numel: int, chunk: int, count: Callable[[int], int]) -> tuple[int, int, int]:
    """(full chunks, entries kept per full chunk, entries kept in the partial last chunk: 0 if none)."""
    full = numel // chunk
    last = numel - full * chunk
    return full, count(chunk) if full else 0, count(last) if last else 0


def sparse_size(numel: int, chunk: int, count: Callable[[int], int]) -> int:
    """Exact payload bytes for `numel` values."""
    full, k_full, k_last = chunk_counts(numel, chunk, count)
    k = full * k_full + k_last
    return LEVEL_BYTES * ceil_div(numel, chunk) + 2 * k + ceil_div(k, 4)


def encode_sparse(x: torch.Tensor, chunk: int, count: Callable[[int], int], limit: float) -> list[torch.Tensor]:
    """float32 x -> [levels, indices, codes] as the layout above; ValueError on NaN/inf (never sent)."""
    if not within(x, limit):
        raise ValueError("refusing to encode NaN/inf, or values the original dtype cannot hold")
    full, k_full, k_last = chunk_counts(x.numel(), chunk, count)
    indices, values = chunk_topk(x, chunk, k_full, k_last)
    codes, levels = [], []
    head = full * k_full
    for part, k in ((values[:head], k_full), (values[head:], k_last)):
        if k and part.numel():
            part_codes, part_levels = two_levels(part, k)
            codes.append(part_codes)
            levels.append(part_levels.clamp_(max=limit))
    if not codes:
        return []
    return [torch.cat(levels).view(-1), indices.to(torch.uint16), pack_crumbs(torch.cat(codes))]


def decode_sparse(take: Callable[[torch.dtype, int], torch.Tensor], numel: int, chunk: int,
                  count: Callable[[int], int], limit: float) -> torch.Tensor:  # fmt: skip
    """The layout above -> float32 tensor of numel values; `take(dtype, n)` reads the next n values.

    Raises MalformedPayload (GARBAGE) for indices out of their chunk or not strictly increasing within it, or
    padding bits set; RejectedUpdate (NON_FINITE) for levels that are NaN, inf, negative, beyond the dtype or
    with low > high. Called only after the total length was checked, so every `take` is in bounds.
    """
    full, k_full, k_last = chunk_counts(numel, chunk, count)
    k = full * k_full + k_last
    nchunks = ceil_div(numel, chunk)
    levels = take(torch.float32, 2 * nchunks).view(-1, 2) if nchunks else torch.empty(0, 2)
    if not within(levels, limit) or bool((levels[:, 0] < 0).any()) or bool((levels[:, 0] > levels[:, 1]).any()):
        raise RejectedUpdate(Reason.NON_FINITE, "a sparseloco level is NaN, inf, negative, too large or low > high")
    local = take(torch.uint16, k).to(torch.int64)
    _check_indices(local, full, k_full, k_last, chunk, numel - full * chunk)
    codes, clean = unpack_crumbs(take(torch.uint8, ceil_div(k, 4)), k)
    if not clean:
        raise MalformedPayload(Reason.GARBAGE, "sparseloco padding bits must be 0")
    owner = torch.cat([torch.arange(full, device=local.device).repeat_interleave(k_full),
                       torch.full((k_last,), full, dtype=torch.int64, device=local.device)])  # fmt: skip
    magnitude = levels[owner, (codes >> 1).to(torch.int64)]
    out = torch.zeros(numel, dtype=torch.float32, device=local.device)
    out[owner * chunk + local] = torch.where((codes & 1).bool(), -magnitude, magnitude)
    return out


def _check_indices(local: torch.Tensor, full: int, k_full: int, k_last: int, chunk: int, last_len: int) -> None:
    """Every in-chunk index below its chunk's length and strictly increasing within its chunk."""
    head = full * k_full
    if head:
        _check_rows(local[:head].view(full, k_full), chunk)
    if k_last:
        _check_rows(local[head:].view(1, k_last), last_len)


def _check_rows(rows: torch.Tensor, bound: int) -> None:
    """uint16 indices are never negative; only the upper bound and the order need checking."""
    if int(rows.max()) >= bound:
        raise MalformedPayload(Reason.GARBAGE, f"sparseloco index beyond its chunk of {bound}")
    if rows.shape[1] > 1 and not bool((rows[:, 1:] > rows[:, :-1]).all()):
        raise MalformedPayload(Reason.GARBAGE, "sparseloco indices must be strictly increasing within a chunk")


# ---------------------------------------------------------------------------------------- sign
#
#     sign  nblocks float32 scales | ceil(numel/8) bytes of sign bits
#
# One bit per value (bit i of byte j is value 8j + i, 1: negative, the last byte's padding bits 0) and one
# scale per block: the block's mean |x|, which minimises the squared error of +-scale. Every value is sent,
# as in 1-bit Adam / EF-signSGD: an Adam pseudo-gradient is spread evenly over its entries (what top-k
# misses), and its magnitudes are alike, which is what a sign and one scale per block can carry.


def sign_size(numel: int, block: int) -> int:
    """Exact payload bytes for `numel` values."""
    return 4 * ceil_div(numel, block) + ceil_div(numel, 8)


def encode_sign(x: torch.Tensor, block: int, limit: float) -> list[torch.Tensor]:
    """float32 x -> [scales, bits]; ValueError on NaN/inf (never sent)."""
    if not within(x, limit):
        raise ValueError("refusing to encode NaN/inf, or values the original dtype cannot hold")
    full = x.numel() // block * block
    means = [x[:full].view(-1, block).abs().mean(1)] if full else []
    if x.numel() > full:
        means.append(x[full:].abs().mean().reshape(1))
    scales = torch.cat(means).clamp_(max=limit) if means else x.new_empty(0)
    return [scales, pack_bits(x < 0)]


def decode_sign(take: Callable[[torch.dtype, int], torch.Tensor], numel: int, block: int,
                limit: float) -> torch.Tensor:  # fmt: skip
    """The layout above -> float32 tensor; RejectedUpdate (NON_FINITE) for a scale that is NaN, inf, negative
    or beyond the dtype, MalformedPayload (GARBAGE) for padding bits set."""
    scales = take(torch.float32, ceil_div(numel, block))
    if not within(scales, limit) or bool((scales < 0).any()):
        raise RejectedUpdate(Reason.NON_FINITE, "a sign scale is NaN, inf, negative or too large")
    negative, clean = unpack_bits(take(torch.uint8, ceil_div(numel, 8)), numel)
    if not clean:
        raise MalformedPayload(Reason.GARBAGE, "sign padding bits must be 0")
    out = scales.repeat_interleave(block)[:numel] if numel else scales.new_empty(0)
    return torch.where(negative, -out, out)
