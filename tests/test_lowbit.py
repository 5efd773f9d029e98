"""The low-bit codecs (protocol/lowbit.py), sparseloco and sign: exact byte layouts, round trips across chunk
boundaries, refusal of hostile payloads, and error feedback (with SparseLoCo's decay)."""

from __future__ import annotations

import math
import random
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec import CodecConfig, Encoded, ErrorFeedback, decode, encode, payload_size
from protocol.errors import MalformedPayload, Reason, RejectedUpdate

pytestmark = pytest.mark.timeout(60)

CONFIG = CodecConfig(name="sparseloco", chunk_size=8, topk_fraction=0.25)
"""Chunks of 8 keeping 2 entries each: small enough to write the bytes out by hand."""


def _with(encoded: Encoded, payload: bytes) -> Encoded:
    return Encoded(encoded.codec, encoded.dtype, encoded.shape, payload)


def _rejects(exc: type, encoded: Encoded, payload: bytes, config: CodecConfig = CONFIG) -> None:
    with pytest.raises(exc) as info:
        decode(_with(encoded, payload), config)
    assert info.value.reason in (Reason.GARBAGE, Reason.NON_FINITE)


def test_layout_written_out() -> None:
    """Two full chunks and a partial one of 3 (keeps ceil(0.75) = 1): levels, uint16 indices, 2-bit codes."""
    x = torch.tensor([0, 5, 0, 0, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, -2, 3, 0, 0, 4], dtype=torch.float32)
    encoded = encode(x, CONFIG)
    levels = struct.pack("<6f", 1, 5, 2, 3, 4, 4)
    indices = struct.pack("<5H", 1, 4, 6, 7, 2)
    # codes: 5 -> high +, -1 -> low -, -2 -> low -, 3 -> high +, 4 -> high + (k == 1: one level)
    codes = [0b10, 0b01, 0b01, 0b10, 0b10]
    packed = bytes([codes[0] | codes[1] << 2 | codes[2] << 4 | codes[3] << 6, codes[4]])
    assert encoded.payload == levels + indices + packed
    assert len(encoded.payload) == payload_size((19,), CONFIG) == 6 * 4 + 5 * 2 + 2
    assert torch.equal(decode(encoded, CONFIG), x)


@settings(max_examples=40, deadline=None)
@given(numel=st.integers(0, 20_000), chunk=st.sampled_from([1, 7, 64, 4096, 2**16]),
       fraction=st.sampled_from([0.01, 0.03, 0.5, 1.0]), seed=st.integers(0, 2**16))  # fmt: skip
def test_round_trip_keeps_signs_and_two_levels_per_chunk(numel: int, chunk: int, fraction: float, seed: int) -> None:
    config = CodecConfig(name="sparseloco", chunk_size=chunk, topk_fraction=fraction)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    encoded = encode(x, config)
    assert len(encoded.payload) == payload_size((numel,), config)
    y = decode(encoded, config, expected_shape=(numel,))
    kept = y != 0
    assert bool((torch.sign(y[kept]) == torch.sign(x[kept])).all())
    rows = torch.cat([y.abs(), y.new_zeros(-numel % chunk)]).view(-1, chunk).sort(dim=1).values
    assert bool(((rows[:, 1:] != rows[:, :-1]).sum(1) <= 2).all())  # 0, low, high per chunk


def test_indices_restart_in_every_chunk() -> None:
    """An index may fall from one chunk to the next; only within a chunk must it rise."""
    config = CodecConfig(name="sparseloco", chunk_size=4096, topk_fraction=0.01)
    x = torch.zeros(3 * 4096)
    x[[4000, 4096 + 3, 8192 + 4095]] = torch.tensor([1.0, -2.0, 3.0])
    y = decode(encode(x, config), config)
    assert float(y[4000]) > 0 and float(y[4096 + 3]) < 0 and float(y[8192 + 4095]) > 0


def test_hostile_indices_and_padding() -> None:
    encoded = encode(torch.randn(19), CONFIG)
    body = bytearray(encoded.payload)
    start = 6 * 4

    def with_index(i: int, value: int) -> bytes:
        forged = bytearray(body)
        forged[start + 2 * i : start + 2 * i + 2] = struct.pack("<H", value)
        return bytes(forged)

    _rejects(MalformedPayload, encoded, with_index(1, 8))  # beyond a full chunk of 8
    _rejects(MalformedPayload, encoded, with_index(4, 3))  # beyond the partial chunk of 3
    _rejects(MalformedPayload, encoded, with_index(4, 65535))
    first = struct.unpack_from("<H", body, start)[0]
    _rejects(MalformedPayload, encoded, with_index(1, first))  # equal: not strictly increasing
    swapped = bytearray(body)
    swapped[start : start + 4] = body[start + 2 : start + 4] + body[start : start + 2]
    _rejects(MalformedPayload, encoded, bytes(swapped))
    padded = bytearray(body)
    padded[-1] |= 0b1100  # the last byte holds one code; its padding must be 0
    _rejects(MalformedPayload, encoded, bytes(padded))


@pytest.mark.parametrize("levels", [(math.nan, 1.0), (1.0, math.inf), (-1.0, 1.0), (2.0, 1.0), (1.0, 1e5)])
def test_hostile_levels(levels: tuple[float, float]) -> None:
    """NaN, inf, negative, low above high, and (for float16) beyond the dtype's max."""
    encoded = encode(torch.randn(19).to(torch.float16), CONFIG)
    forged = struct.pack("<2f", *levels) + encoded.payload[8:]
    _rejects(RejectedUpdate, encoded, forged)


def test_random_byte_flips_never_crash_or_decode_non_finite() -> None:
    config = CodecConfig(name="sparseloco", chunk_size=64, topk_fraction=0.1)
    encoded = encode(torch.randn(1000), config)
    rng = random.Random(0)
    for _ in range(300):
        forged = bytearray(encoded.payload)
        for _ in range(rng.randint(1, 4)):
            forged[rng.randrange(len(forged))] = rng.randrange(256)
        try:
            y = decode(_with(encoded, bytes(forged)), config)
        except (MalformedPayload, RejectedUpdate):
            continue
        assert bool(torch.isfinite(y).all())


def test_error_feedback_tracks_the_sum() -> None:
    """Plain error feedback (decay 1): what partners received plus the residual is exactly what was meant."""
    config = CodecConfig(name="sparseloco", chunk_size=256, topk_fraction=0.03)
    feedback = ErrorFeedback(config)
    generator = torch.Generator().manual_seed(0)
    sent, received = torch.zeros(2000), torch.zeros(2000)
    for _ in range(60):
        x = torch.randn(2000, generator=generator) * 0.1 + 0.05
        sent += x
        received += decode(feedback.encode("w", x), config)
    assert torch.allclose(received + feedback.state_dict()["w"], sent, atol=1e-3)
    assert float((received - sent).norm()) < 0.5 * float(sent.norm())


def test_error_feedback_decay_is_sparselocos_momentum() -> None:
    """decay beta: e = beta * e + x; send compress(e); e -= what was sent."""
    config = CodecConfig(name="sparseloco", chunk_size=64, topk_fraction=0.05, feedback_decay=0.9)
    feedback = ErrorFeedback(config)
    e = torch.zeros(500)
    for seed in range(5):
        x = torch.randn(500, generator=torch.Generator().manual_seed(seed))
        e = 0.9 * e + x
        sent = decode(feedback.encode("w", x), config)
        e = e - sent
        assert torch.allclose(feedback.state_dict()["w"], e, atol=1e-5)


# ------------------------------------------------------------------------------------------------ sign

SIGN = CodecConfig(name="sign", block_size=4)


def test_sign_layout_written_out() -> None:
    """Blocks of 4 (the last partial): mean |x| per block, then sign bits, lowest first, padding 0."""
    x = torch.tensor([1.0, -3.0, 2.0, -2.0, 0.0, 5.0, -1.0, 4.0, -6.0])
    encoded = encode(x, SIGN)
    bits = bytes([0b0100_1010, 0b0000_0001])  # negatives at 1, 3, 6 and 8
    assert encoded.payload == struct.pack("<3f", 2.0, 2.5, 6.0) + bits
    assert torch.equal(decode(encoded, SIGN), torch.tensor([2.0, -2, 2, -2, 2.5, 2.5, -2.5, 2.5, -6]))


def test_sign_refuses_hostile_scales_and_padding() -> None:
    encoded = encode(torch.randn(9).to(torch.float16), SIGN)
    for scale in (math.nan, math.inf, -1.0, 1e5):
        _rejects(RejectedUpdate, encoded, struct.pack("<f", scale) + encoded.payload[4:], SIGN)
    padded = bytearray(encoded.payload)
    padded[-1] |= 0b10
    _rejects(MalformedPayload, encoded, bytes(padded), SIGN)


def test_sign_error_feedback_tracks_the_sum() -> None:
    feedback = ErrorFeedback(CodecConfig(name="sign", block_size=64))
    generator = torch.Generator().manual_seed(1)
    sent, received = torch.zeros(1000), torch.zeros(1000)
    for _ in range(40):
        x = torch.randn(1000, generator=generator) * 0.1 + 0.02
        sent += x
        received += decode(feedback.encode("w", x), feedback.config)
    assert torch.allclose(received + feedback.state_dict()["w"], sent, atol=1e-3)
    assert float((received - sent).norm()) < 0.2 * float(sent.norm())
