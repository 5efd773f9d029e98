"""Which windows of a sharded dataset each peer's stream reads, from the shards' token counts alone.

Why a plan apart from the reader: a volunteer downloads only the shards its own stream reaches (DESIGN.md
section 5), so "which shard files does stream s need for round r, in what order" must be answerable from
index.json before any shard is on disk, and cheaply. Nothing here opens a file.

The contract (the same properties as peer/core/data.py `TokenStream`, laid out so that a stream needs few shards):
- A window is seq_len + 1 tokens inside one shard: window w of shard k is tokens [w (T+1), (w+1) (T+1)) of it;
  a shard's last tokens % (T+1) go unused (at most seq_len of 2^24), windows never straddle two files.
- Epoch e orders the shards with a permutation keyed by (seed, e) and lays their windows end to end: N windows.
  Stream s of S owns the slice [s W, (s+1) W) of that line, W = N // S (the last N % S windows go unused).
  Slices are disjoint, so streams never share a window within an epoch; a slice spans about S/K + 1 shards of
  K, which is what a peer downloads per epoch.
- Inside its slice the stream reads the windows in an order keyed by (seed, e, s), so its batches mix all of
  its shards; position p of the stream in epoch e is window slice[perm(p)]. Batch (round, step) of size B takes
  positions (round * steps_per_round + step) * B ... + B - 1, running on into epoch e + 1 (a new shard order,
  a new slice) at W. So a batch depends only on (seed, S, s, round, step, B) and the token counts: no state,
  no repeats within an epoch, resumable at any round.
- The permutations are a keyed Feistel network (blake2b keys, splitmix64 rounds, cycle walking), computed
  per position in integer arithmetic: no RNG whose stream could change between torch or numpy versions on
  different volunteers' machines, and no W-sized array to build for a round's shard list.
Epoch e of the shuffle is keyed with e mod 2^63, as in TokenStream (only a lying round gets that far).

When a stream's shards cannot be had (the server gone, no peer holds them; peer/core/fetch.py `stream_for_round`),
the peer trains that round on another stream, tried in `fallback_streams` order: a permutation of the other
streams keyed by (seed-free) own stream and round, so two peers stranded together spread over different streams,
and a rerun picks the same ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_FEISTEL_ROUNDS = 6
_MASK64 = (1 << 64) - 1
_SHARD_ORDER, _WINDOW_ORDER = 1, 2  # domain tags of the two permutations' keys
_CACHED_EPOCHS = 2


def _keys(*values: int) -> np.ndarray:
    """_FEISTEL_ROUNDS 64-bit round keys from integers (blake2b: stable across processes, unlike hash())."""
    data = b"".join((v & _MASK64).to_bytes(8, "little") for v in values)
    digest = hashlib.blake2b(data, digest_size=8 * _FEISTEL_ROUNDS, person=b"murmur-shards").digest()
    return np.frombuffer(digest, dtype="<u8").astype(np.uint64)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every output bit depends on every input bit (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(positions: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """perm(positions) for a bijection perm of [0, n) chosen by `keys`: a balanced Feistel network on the
    smallest even number of bits that holds n, walked again until the value lands below n (under 4 steps on
    average, since the domain is under 4 n)."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)

    def once(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for key in keys:
            left, right = right, left ^ (_mix(right + key) & mask)
        return (left << shift) | right

    with np.errstate(over="ignore"):
        out = once(np.asarray(positions, dtype=np.uint64))
        outside = out >= np.uint64(n)
        while outside.any():
            out[outside] = once(out[outside])
            outside = out >= np.uint64(n)
    return out.astype(np.int64)


class StreamPlan:
    """Stream `stream_index` of `num_streams` over shards of `shard_tokens` tokens: see the module docstring."""

    def __init__(self, shard_tokens: Sequence[int], seq_len: int, *, stream_index: int, num_streams: int,
                 steps_per_round: int, seed: int = 0) -> None:  # fmt: skip
        if seq_len < 1 or steps_per_round < 1 or num_streams < 1:
            raise ValueError("seq_len, steps_per_round and num_streams must be >= 1")
        if not 0 <= stream_index < num_streams:
            raise ValueError(f"stream_index {stream_index} not in [0, {num_streams})")
        self.seq_len, self.stream_index, self.num_streams = seq_len, stream_index, num_streams
        self.steps_per_round, self.seed = steps_per_round, seed
        self.shard_windows = np.array([t // (seq_len + 1) for t in shard_tokens], dtype=np.int64)
        self.n_windows = int(self.shard_windows.sum())
        self.windows_per_epoch = self.n_windows // num_streams
        if self.windows_per_epoch < 1:
            raise ValueError(
                f"{len(self.shard_windows)} shard(s) make {self.n_windows} windows of {seq_len + 1} tokens, "
                f"fewer than the {num_streams} streams need; use a bigger dataset or shorter seq_len"
            )
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, ends) of epoch: shard indices in line order and the cumulative window count after each."""
        if epoch not in self._epochs:
            keys = _keys(_SHARD_ORDER, self.seed, epoch % (1 << 63))
            order = permute(np.arange(len(self.shard_windows)), len(self.shard_windows), keys)
            if len(self._epochs) >= _CACHED_EPOCHS:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = order, np.cumsum(self.shard_windows[order])
        return self._epochs[epoch]

    def _locate(self, epoch: int, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, window in shard) of this stream's positions `offsets` (each < windows_per_epoch) in epoch."""
        order, ends = self._layout(epoch)
        keys = _keys(_WINDOW_ORDER, self.seed, epoch % (1 << 63), self.stream_index, self.num_streams)
        line = self.stream_index * self.windows_per_epoch + permute(offsets, self.windows_per_epoch, keys)
        slot = np.searchsorted(ends, line, side="right")
        return order[slot], line - (ends[slot] - self.shard_windows[order[slot]])

    def _spans(self, start: int, count: int) -> list[tuple[int, np.ndarray]]:
        """Positions start .. start + count - 1 of the stream as (epoch, offsets in that epoch) pieces. Python
        ints until the offsets: a round is whatever the wire carried (uint64), far past int64 once multiplied."""
        spans = []
        epoch, offset = divmod(start, self.windows_per_epoch)
        while count > 0:
            take = min(count, self.windows_per_epoch - offset)
            spans.append((epoch, np.arange(offset, offset + take, dtype=np.int64)))
            epoch, offset, count = epoch + 1, 0, count - take
        return spans

    def windows(self, round: int, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, window in shard) of each window of batch (round, step), each of shape (batch_size,)."""
        if round < 0 or not 0 <= step < self.steps_per_round:
            raise ValueError(f"need round >= 0 and 0 <= step < {self.steps_per_round}; got {round}, {step}")
        self._check_batch(batch_size)
        located = [self._locate(e, o) for e, o in self._spans((round * self.steps_per_round + step) * batch_size,
                                                               batch_size)]  # fmt: skip
        return np.concatenate([s for s, _ in located]), np.concatenate([w for _, w in located])

    def shards_for_round(self, round: int, batch_size: int) -> list[int]:
        """Indices of the shards that round `round`'s batches read, in the order they are first read: what a
        lazy downloader fetches (and prefetches for round + 1) before the round starts."""
        if round < 0:
            raise ValueError(f"need round >= 0, got {round}")
        self._check_batch(batch_size)
        per_round = self.steps_per_round * batch_size
        shards = np.concatenate([self._locate(e, o)[0] for e, o in self._spans(round * per_round, per_round)])
        _, first = np.unique(shards, return_index=True)
        return [int(shards[i]) for i in sorted(first)]

    def shards_for_epoch(self, epoch: int) -> list[int]:
        """Indices of the shards this stream's slice spans in epoch `epoch`, in line order (a superset of any
        round's list in that epoch; a peer that wants a whole epoch on disk fetches these)."""
        order, ends = self._layout(epoch)
        low = self.stream_index * self.windows_per_epoch
        high = low + self.windows_per_epoch
        starts = ends - self.shard_windows[order]
        spans = (starts < high) & (ends > low) & (self.shard_windows[order] > 0)
        return [int(k) for k in order[spans]]

    def _check_batch(self, batch_size: int) -> None:
        if not 1 <= batch_size <= self.windows_per_epoch:
            raise ValueError(
                f"batch_size {batch_size} needs 1..{self.windows_per_epoch} windows per stream and epoch "
                f"({self.n_windows} windows of {self.seq_len + 1} tokens, {self.num_streams} streams)"
            )


_FALLBACK_ORDER = 3


def fallback_streams(stream_index: int, num_streams: int, round: int) -> list[int]:
    """The other streams, in the order a peer on `stream_index` tries them for round `round` when its own shards
    cannot be had: a permutation keyed by (stream, round), the same on every machine."""
    if num_streams < 2:
        return []
    keys = _keys(_FALLBACK_ORDER, stream_index, num_streams, round % (1 << 63))
    order = permute(np.arange(num_streams - 1), num_streams - 1, keys)
    return [int(k) + int(k >= stream_index) for k in order]
