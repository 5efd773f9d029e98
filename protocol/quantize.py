"""The arithmetic under the int8, int4 and top-k codecs (protocol/codec.py): blockwise absmax quantisation,
nibble packing, exact top-k selection, and the bounds that keep every decoded value finite.

Split from the codec so that `codec.py` reads as the wire format (what the bytes are, and what a receiver
checks before it allocates) and this module as the kernels that fill and read them, tuned for CPU and CUDA.
"""

from __future__ import annotations

import math

import torch


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for non-negative integers, without floats."""
    return -(-a // b)


def within(t: torch.Tensor, bound: float) -> bool:
    """All finite and |t| <= bound, in one reduction with no tensor-sized temporary (min/max
    propagate NaN). The encoder and decoder share it: we never send what a receiver would refuse,
    e.g. float32 that overflows bfloat16, or an fp16 tensor's 65504 that bf16 rounds to 65536."""
    if t.numel() == 0:
        return True
    low, high = (float(v) for v in torch.aminmax(t))
    return math.isfinite(low) and math.isfinite(high) and -bound <= low and high <= bound


def block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """max |x| per block of `block` consecutive values; the last block may be partial. NaN propagates."""
    full = x.numel() // block * block
    parts = []
    if full:
        low, high = torch.aminmax(x[:full].view(-1, block), dim=1)
        parts.append(torch.maximum(high, -low))
    if x.numel() > full:
        parts.append(x[full:].abs().amax().reshape(1))
    return torch.cat(parts) if parts else x.new_empty(0)


def quantize(x: torch.Tensor, block: int, qmax: int, limit: float, q: torch.Tensor) -> torch.Tensor:
    """Symmetric absmax quantisation: fills q (int8, x's size) and returns the float32 block scales.

    On CPU it walks the tensor in chunks of whole blocks through one reused float32 scratch buffer:
    a tensor-sized temporary costs more in page faults than the arithmetic itself (2x faster on 16M).
    Chunks stay large (4M values) because every op is an OpenMP region, and when the cores are
    shared with training each region can wait milliseconds for a descheduled thread.
    """
    numel = x.numel()
    scales = torch.empty(ceil_div(numel, block), dtype=torch.float32, device=x.device)
    step = numel if x.device.type != "cpu" else max(block, CHUNK // block * block)
    scratch = torch.empty(min(step, numel), dtype=torch.float32, device=x.device)
    for start in range(0, numel, step):
        stop = min(numel, start + step)
        absmax = block_absmax(x[start:stop], block)
        if not within(absmax, math.inf):
            raise ValueError("refusing to encode a tensor with NaN or inf")
        chunk_scales = absmax.div_(qmax).clamp_(max=limit)
        scales[start // block : start // block + chunk_scales.numel()] = chunk_scales
        quantize_chunk(x[start:stop], chunk_scales, block, qmax, q[start:stop], scratch)
    return scales


CHUNK = 2**22


def quantize_chunk(
    x: torch.Tensor, scales: torch.Tensor, block: int, qmax: int, q: torch.Tensor, scratch: torch.Tensor
) -> None:
    """q = clamp(round(x / scale)) for a run of blocks starting on a block boundary."""
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
    full = x.numel() // block * block
    if full:
        buffer = scratch[:full].view(-1, block)
        torch.div(x[:full].view(-1, block), divisor[: full // block, None], out=buffer)
        q[:full].view(-1, block).copy_(buffer.round_().clamp_(-qmax, qmax))
    if x.numel() > full:
        q[full:] = (x[full:] / divisor[-1]).round_().clamp_(-qmax, qmax)


def largest(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the k largest entries, exactly (ties broken arbitrarily).

    torch.topk over tens of millions of entries takes seconds on a CPU, so big tensors first keep
    the entries above a threshold estimated from a fixed random sample (aiming at about 2k of
    them), then run topk on those; entries equal to the threshold fill up when fewer than k are
    above it (a mostly-zero delta). Everything dropped is below the threshold, so the result is the
    exact top k; only when the threshold overshot does it fall back to the full topk.
    """
    numel = magnitude.numel()
    if numel > TOPK_SAMPLE * 4 and k * 8 < numel:
        generator = torch.Generator().manual_seed(0)
        picks = torch.randint(numel, (TOPK_SAMPLE,), generator=generator).to(magnitude.device)
        rank = max(1, TOPK_SAMPLE - (2 * k * TOPK_SAMPLE) // numel)
        threshold = magnitude[picks].kthvalue(rank).values
        above = (magnitude > threshold).nonzero().view(-1)
        if above.numel() >= k:
            return above[torch.topk(magnitude[above], k, sorted=False).indices].sort().values
        ties = (magnitude == threshold).nonzero().view(-1)
        if above.numel() + ties.numel() >= k:
            return torch.cat([above, ties[: k - above.numel()]]).sort().values
    return torch.topk(magnitude, k, sorted=False).indices.sort().values


TOPK_SAMPLE = 2**16


def scale_limit(qmax: int, dtype: torch.dtype) -> float:
    """Largest float32 scale with qmax * scale <= the dtype's max, so no decoded value overflows.

    The encoder caps its scales here (a block at the dtype's very edge then rounds to qmax anyway)
    and the decoder refuses anything above; q itself is clamped to [-qmax, qmax] on decode.
    """
    exact = float(torch.finfo(dtype).max) / qmax
    limit = torch.tensor(exact, dtype=torch.float32)
    if float(limit) > exact:
        limit = torch.nextafter(limit, torch.zeros_like(limit))
    return float(limit)


def pack_nibbles(q: torch.Tensor, packed: torch.Tensor) -> None:
    """int8 values in [-7, 7] -> bytes holding q + 8, low nibble first; an odd tail pads with 8 (zero).

    Works on q's two's-complement bytes with uint8 wrap-around, writing straight into `packed`:
    (hi + 8) * 16 keeps only hi's nibble, and (lo + 8) mod 256 lands in [1, 15] so it cannot carry.
    """
    pairs = q.numel() // 2
    raw = q.view(torch.uint8)
    body = packed[:pairs]
    torch.add(raw[1 : 2 * pairs : 2], 8, out=body)
    body.mul_(16).add_(raw[0 : 2 * pairs : 2]).add_(8)
    if q.numel() % 2:
        packed[pairs:] = raw[-1:] + (8 + 8 * 16)


def dequantize(q: torch.Tensor, scales: torch.Tensor, block: int, qmax: int) -> torch.Tensor:
    """float32 clamp(q) * scale of its block, the last block possibly partial (in place for float32 q).

    The clamp turns a forged -128 (or int4 nibble 0) into -qmax, so |value| <= qmax * scale <= the
    dtype's max, which _take_scales guaranteed.
    """
    out = q.to(torch.float32).clamp_(-qmax, qmax)
    full = out.numel() // block * block
    if full:
        out[:full].view(-1, block).mul_(scales[: full // block, None])
    if out.numel() > full:
        out[full:].mul_(scales[-1])
    return out


def chunk_topk(x: torch.Tensor, chunk: int, k_full: int, k_last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseLoCo's chunked top-k: the k largest |x| of every `chunk` consecutive values (k_last in a partial
    last chunk). Returns (in-chunk indices int64, ascending within each chunk; their values), chunk-major.

    Per-chunk selection spreads what is sent over the whole tensor (one global top-k concentrates on a
    few rows) and keeps each index below `chunk`, so 2 bytes address it whatever the tensor's size.
    """
    full = x.numel() // chunk * chunk
    indices, values = [], []
    if full and k_full:
        rows = x[:full].view(-1, chunk)
        picked = torch.topk(rows.abs(), k_full, dim=1, sorted=False).indices.sort(dim=1).values
        indices.append(picked.reshape(-1))
        values.append(rows.gather(1, picked).reshape(-1))
    if x.numel() > full and k_last:
        tail = x[full:]
        picked = largest(tail.abs(), k_last)
        indices.append(picked)
        values.append(tail[picked])
    if not indices:
        return x.new_empty(0, dtype=torch.int64), x.new_empty(0)
    return torch.cat(indices), torch.cat(values)


def two_levels(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2-bit codes and per-row (low, high) magnitudes for rows of `k` kept values (values.numel() % k == 0).

    Code bit 0 is the sign (1: negative), bit 1 picks the high level. Each row's magnitudes split at their
    median; a level is the mean magnitude of its half (one Lloyd step from the median split: the least
    squared error for that split). With k == 1 both levels are the value's magnitude.
    """
    mags = values.abs().view(-1, k)
    order = mags.argsort(dim=1)
    high = torch.zeros_like(mags, dtype=torch.bool).scatter_(1, order[:, k // 2 :], True)
    high_level = (mags * high).sum(1) / high.sum(1)
    low_count = (~high).sum(1)
    low_level = torch.where(low_count > 0, (mags * ~high).sum(1) / low_count.clamp(min=1), high_level)
    levels = torch.stack([torch.minimum(low_level, high_level), high_level], dim=1)
    codes = (values.view(-1, k) < 0).to(torch.uint8) | (high.to(torch.uint8) << 1)
    return codes.view(-1), levels


def pack_crumbs(codes: torch.Tensor) -> torch.Tensor:
    """2-bit codes (uint8 in [0, 3]) -> bytes of four, lowest bits first; the padding of the last byte is 0."""
    padded = torch.zeros(ceil_div(codes.numel(), 4) * 4, dtype=torch.uint8, device=codes.device)
    padded[: codes.numel()] = codes
    quads = padded.view(-1, 4)
    return quads[:, 0] | (quads[:, 1] << 2) | (quads[:, 2] << 4) | (quads[:, 3] << 6)


def unpack_crumbs(packed: torch.Tensor, count: int) -> tuple[torch.Tensor, bool]:
    """(the `count` 2-bit codes of `packed`, whether every padding bit after them is 0)."""
    quads = torch.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], dim=1).view(-1)
    return quads[:count], not bool(quads[count:].any())


_BIT_WEIGHTS = [1 << i for i in range(8)]


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Booleans -> bytes of eight, bit i of byte j holding entry 8j + i; the last byte's padding is 0."""
    padded = torch.zeros(ceil_div(bits.numel(), 8) * 8, dtype=torch.uint8, device=bits.device)
    padded[: bits.numel()] = bits.reshape(-1)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> tuple[torch.Tensor, bool]:
    """(the first `count` bits of `packed` as booleans, whether every padding bit after them is 0)."""
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    bits = (packed.view(-1, 1) & weights).ne(0).view(-1)
    return bits[:count], not bool(bits[count:].any())
