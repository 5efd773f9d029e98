"""N virtual peers in one process, no network: compares DDP, DiLoCo, all-reduce PPU and gossip PPU.

Every method sees the same tokens (each peer's deterministic stream, round by round) and the same
inner optimiser, so differences come from the outer step and the parameter slices alone. The outer
steps are the functions of `peer/core/outer.py` that the daemon calls; pseudo-gradients go through the
real codec (with error feedback), so compression costs show up in the loss.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from peer.core.data import Corpus, TokenStream, unigram_entropy
from peer.core.evaluation import average_weights, load_weights, val_loss
from peer.core.inner import InnerConfig, SliceOptimizer, inner_round
from peer.core.model import DTYPES, ModelConfig, Transformer, cast_parameters
from peer.core.outer import (
    DEFAULT_OUTER,
    METHODS,
    CoordinateMean,
    OuterConfig,
    consensus_distance,
    initial_state,
    nesterov_step,
)
from peer.core.slices import (
    Contribution,
    Params,
    SliceConfig,
    SliceLayout,
    full_layout,
    parameter_shapes,
    partition,
    slice_cost,
    weight_slice,
)
from peer.node.gossip import PartnerTerms, outer_step
from protocol.codec import CodecConfig, Encoded, ErrorFeedback, decode, encode, payload_size


@dataclass(frozen=True, kw_only=True, slots=True)
class SimConfig:
    model: ModelConfig
    inner: InnerConfig
    slices: SliceConfig = field(default_factory=SliceConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    weights_codec: CodecConfig | None = field(default_factory=lambda: CodecConfig(name="bf16"))
    """Codec of the weight slice gossip sends for the consensus term; None sends none (no consensus pull:
    partners' deltas alone mix the peers; benchmarks/sparse_codec.py measures what that costs)."""
    peers: int = 8
    rounds: int = 10
    fanout: int = 2
    """Gossip partners per round (random matchings; partners with other slices preferred); 2 as the daemon."""
    consensus_slice: str = "rotate"
    """Gossip methods: which weights a peer sends for the consensus term: `rotate` (slice round % K, every
    peer the same one, as the daemon) or `own` (the sender's own slice; 16 rounds: 2.361 vs 2.391 with one
    partner, no difference with two)."""
    own_uncompressed: bool = False
    """Gossip methods: a peer mixes its own pseudo-gradient as trained, not as its partners decode it (with a
    sparse codec the sent delta is a few percent of it; error feedback delays the rest by many rounds)."""
    overlap: bool = False
    """Gossip methods: a round's exchange overlaps the next round's inner steps (the daemon's default). Each
    round's outer step is taken at once from the peer's own new delta and the partners' terms of the round
    before, which travelled while this round trained (an eager update: Kale et al., arXiv 2502.12996); the
    last round's partner terms are never mixed, as in the daemon."""
    seed: int = 0
    eval_every: int = 2
    eval_batches: int = 8
    outer: dict[str, OuterConfig] = field(default_factory=lambda: dict(DEFAULT_OUTER))
    dtype: str = "float32"
    """The peers' parameters (a run's dtype): bfloat16 trains bf16 models with fp32 masters of the slice."""
    outer_dtype: str = "float32"
    """phi's dtype: float32 as the daemon keeps it whatever `dtype` is; "" = `dtype` (a bf16 phi: the comparison
    that chose the daemon's, benchmarks/README, **peer_memory**)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES or self.outer_dtype not in (*DTYPES, ""):
            raise ValueError(f"dtype and outer_dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}, "
                             f"{self.outer_dtype!r}")  # fmt: skip
        if self.consensus_slice not in ("rotate", "own"):
            raise ValueError(f"consensus_slice must be 'rotate' or 'own', got {self.consensus_slice!r}")
        if self.fanout < 1:
            raise ValueError(f"fanout must be >= 1, got {self.fanout}")

    @property
    def tokens_per_round(self) -> int:
        i = self.inner
        return self.peers * i.steps_per_round * i.batch_size * i.grad_accum * self.model.seq_len


@dataclass(kw_only=True, slots=True)
class MethodResult:
    val_loss: float
    """Mean over peers of each peer's own weights' validation loss."""
    val_loss_of_mean_weights: float
    train_loss: float
    tokens: int
    bytes_per_peer_per_round: int
    backward_flops: float
    peak_state_bytes_per_peer: int
    consensus_distance: float
    wall_seconds: float
    outer: dict
    curve: list[tuple[int, float]]


def evaluate(model: Transformer, weights: Params, corpus: Corpus, config: SimConfig) -> float:
    """Validation loss of `weights` on the same held-out batches every time (peer/core/evaluation.py)."""
    load_weights(model, weights)
    return val_loss(model, corpus, seq_len=config.model.seq_len, batch_size=config.inner.batch_size * 2,
                    batches=config.eval_batches)  # fmt: skip


def snapshot(model: Transformer) -> Params:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def matchings(n: int, fanout: int, slice_of: list[int], rng: random.Random) -> list[set[int]]:
    """Partners of each peer: `fanout` random perfect matchings, the one with most cross-slice pairs kept."""
    partners: list[set[int]] = [set() for _ in range(n)]
    for _ in range(fanout):
        best, best_score = None, -1
        for _ in range(8):
            order = list(range(n))
            rng.shuffle(order)
            pairs = [(order[i], order[i + 1]) for i in range(0, n - 1, 2)]
            score = sum(slice_of[a] != slice_of[b] for a, b in pairs)
            if score > best_score:
                best, best_score = pairs, score
        for a, b in best:
            partners[a].add(b)
            partners[b].add(a)
    return partners


class Simulation:
    """One method's run: peers, their streams and optimisers, and the outer step between rounds."""

    def __init__(self, method: str, corpus: Corpus, config: SimConfig) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        self.method, self.corpus, self.config = method, corpus, config
        torch.manual_seed(config.seed)
        self.model = Transformer(config.model)
        phi = {name: t.to(DTYPES[config.outer_dtype or config.dtype]) for name, t in snapshot(self.model).items()}
        self.shapes = parameter_shapes(config.model)
        sliced = method in ("ppu",) or method.startswith("gossip")
        all_slices = partition(config.model, config.slices) if sliced else [full_layout(self.shapes)]
        self.layouts = [all_slices[k % len(all_slices)] for k in range(config.peers)]
        self.all_slices = all_slices
        self.outer = config.outer.get(method)
        self.phis = [phi] if method in ("ddp", "diloco", "ppu") else [_clone(phi) for _ in range(config.peers)]
        init = self.outer if self.outer is not None else OuterConfig()
        self.states = [initial_state(p, init) for p in self.phis]
        self.models = [cast_parameters(Transformer(config.model), config.dtype)
                       for _ in range(config.peers)] if method != "ddp" else []  # fmt: skip
        ddp_inner = replace(config.inner, batch_size=config.inner.batch_size * config.peers)
        if method == "ddp":
            self.optimizers = [SliceOptimizer(self.model, full_layout(self.shapes), ddp_inner)]
        else:
            self.optimizers = [SliceOptimizer(m, lay, config.inner) for m, lay in zip(self.models, self.layouts)]
        self.feedback = [ErrorFeedback(config.codec) for _ in range(config.peers)]
        self.streams = [
            TokenStream(corpus.train, config.model.seq_len, stream_index=k, num_streams=config.peers,
                        steps_per_round=config.inner.steps_per_round * config.inner.grad_accum, seed=config.seed)
            for k in range(config.peers)
        ]  # fmt: skip
        self.rng = random.Random(config.seed)
        self.bytes_sent = 0
        self.train_loss = float("nan")
        self.in_flight: Exchange | None = None
        """With `overlap`: the exchange of the previous round, whose partner terms land with this round's step."""

    def batches(self, k: int, round_index: int) -> Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]:
        accum, b = self.config.inner.grad_accum, self.config.inner.batch_size

        def get(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
            local = (step % self.config.inner.steps_per_round) * accum + micro
            if self.method != "ddp":
                return self.streams[k].batch(round_index, local, b)
            parts = [s.batch(round_index, local, b) for s in self.streams]
            return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

        return get

    def run_round(self, r: int) -> None:
        device = torch.device("cpu")
        if self.method == "ddp":
            stats = inner_round(self.model, self.optimizers[0], self.batches(0, r), device)
            self.phis[0] = snapshot(self.model)
            self.train_loss = stats.mean_loss
            self.bytes_sent += self._ddp_bytes()
            return
        deltas = self.train_peers(r)
        if self.method.startswith("gossip"):
            exchange = self._exchange(deltas, r)
            if self.config.overlap:
                previous, self.in_flight = self.in_flight, exchange
                self._gossip(previous, own=deltas)
            else:
                self._gossip(exchange)
        else:
            self._all_reduce(deltas)

    def train_peers(self, r: int) -> list[Contribution]:
        """Round r's inner steps of every peer; their pseudo-gradients as partners decode them."""
        device = torch.device("cpu")
        deltas, losses = [], []
        self.uncompressed: list[Contribution] = []
        for k, (model, optimizer) in enumerate(zip(self.models, self.optimizers)):
            start = self.inner_start(k, self.phis[k % len(self.phis)])
            load_weights(model, start)
            losses.append(inner_round(model, optimizer, self.batches(k, r), device, start=start).mean_loss)
            packed = optimizer.pseudo_gradient(start)  # from the fp32 masters of a bf16 model
            delta = Contribution(self.layouts[k], {name: packed[name] for name in self.layouts[k]})
            deltas.append(self._compress(k, delta))
            self.uncompressed.append(delta)
        self.train_loss = sum(losses) / len(losses)
        return deltas

    def inner_start(self, k: int, phi: Params) -> Params:
        """The weights peer k's inner round starts from, and its pseudo-gradient is taken from: its outer
        weights (a seam for diagnostics)."""
        return phi

    def _compress(self, k: int, delta: Contribution) -> Contribution:
        """What a partner receives: the delta through the codec, with this peer's error feedback."""
        return through_codec(delta, self.config.codec, self.feedback[k].encode)

    def _all_reduce(self, deltas: list[Contribution]) -> None:
        mean = CoordinateMean(self.phis[0])
        for d in deltas:
            mean.add(d)
        nesterov_step(self.phis[0], self.states[0], mean.mean(), self.outer.lr, self.outer.momentum)
        self.bytes_sent += self._all_reduce_bytes()

    def _exchange(self, deltas: list[Contribution], r: int) -> Exchange:
        """Round r's messages: who swaps with whom, and the weight slices as sent now (before round r's outer
        step, as the daemon encodes them)."""
        n = self.config.peers
        slice_of = [k % len(self.all_slices) for k in range(n)]
        partners = matchings(n, self.config.fanout, slice_of, self.rng)
        rotating = self.all_slices[r % len(self.all_slices)]
        consensus = [self.layouts[k] if self.config.consensus_slice == "own" else rotating for k in range(n)]
        codec = self.config.weights_codec
        plain = lambda _, t: encode(t, codec)  # noqa: E731 - weights carry no error feedback
        shared = [through_codec(weight_slice(phi, lay), codec, plain) if codec else None
                  for phi, lay in zip(self.phis, consensus)]  # fmt: skip
        sent = sum(len(p) for p in partners) / n
        weight_bytes = self._payload(consensus[0], weights=True) if codec else 0
        self.bytes_sent += int(sent * (self._payload(self.layouts[0]) + weight_bytes))
        return Exchange(deltas, shared, partners)

    def _gossip(self, exchange: Exchange | None, own: list[Contribution] | None = None) -> None:
        """Every peer's outer step: its own delta (this exchange's, or `own`'s) and its partners' terms in
        `exchange` (none when it is None: the first round with overlap)."""
        for k in range(self.config.peers):
            mine = sorted(exchange.partners[k]) if exchange is not None else []
            received = [exchange.deltas[j] for j in mine]
            weights = [exchange.weights[j] for j in mine if exchange.weights[j] is not None]
            own_k = own[k] if own is not None else exchange.deltas[k]
            if self.config.own_uncompressed:
                own_k = self.uncompressed[k]
            outer_step(self.phis[k], self.states[k], own_k, PartnerTerms(received, weights), self.outer)

    def _payload(self, layout: SliceLayout, *, weights: bool = False) -> int:
        codec = self.config.weights_codec if weights else self.config.codec
        return sum(payload_size(r.compact_shape(self.shapes[n]), codec) for n, r in layout.items())

    def _all_reduce_bytes(self) -> int:
        """Bytes one peer sends per round: ring all-reduce (DiLoCo), slice all-reduce + broadcast (PPU)."""
        n = self.config.peers
        if self.method == "diloco":
            return int(2 * (n - 1) / n * self._payload(self.layouts[0]))
        m = max(1, n // len(self.all_slices))  # owners per slice
        return int(self._payload(self.layouts[0]) * (2 * (m - 1) + (n - m)) / m)

    def _ddp_bytes(self) -> int:
        n, params = self.config.peers, sum(torch.Size(s).numel() for s in self.shapes.values())
        return int(self.config.inner.steps_per_round * 2 * (n - 1) / n * 4 * params)

    def result(self, tokens: int, curve: list[tuple[int, float]], seconds: float) -> MethodResult:
        config, evaluator = self.config, self.model
        own = [evaluate(evaluator, phi, self.corpus, config) for phi in self.phis]
        mean_phi = average_weights(self.phis) if len(self.phis) > 1 else self.phis[0]
        costs = [slice_cost(config.model, lay, rest_moves=config.inner.rest_step > 0) for lay in self.layouts]
        per_token = sum(c.backward_flops_per_token for c in costs) / len(costs)
        return MethodResult(
            val_loss=sum(own) / len(own),
            val_loss_of_mean_weights=evaluate(evaluator, mean_phi, self.corpus, config),
            train_loss=self.train_loss,
            tokens=tokens,
            bytes_per_peer_per_round=self.bytes_sent // max(1, config.rounds),
            backward_flops=per_token * tokens,
            peak_state_bytes_per_peer=max(o.state_bytes() for o in self.optimizers),
            consensus_distance=consensus_distance(self.phis) if len(self.phis) > 1 else 0.0,
            wall_seconds=seconds,
            outer={} if self.outer is None else {"rule": self.outer.rule, "lr": self.outer.lr,
                                                 "momentum": self.outer.momentum, "consensus": self.outer.consensus},
            curve=curve,
        )  # fmt: skip

    def run(self, on_round: Callable[[], None] = lambda: None) -> MethodResult:
        start, curve = time.perf_counter(), []
        for r in range(self.config.rounds):
            self.run_round(r)
            tokens = (r + 1) * self.config.tokens_per_round
            if (r + 1) % self.config.eval_every == 0 or r + 1 == self.config.rounds:
                losses = [evaluate(self.model, phi, self.corpus, self.config) for phi in self.phis]
                curve.append((tokens, sum(losses) / len(losses)))
            on_round()
        return self.result(self.config.rounds * self.config.tokens_per_round, curve, time.perf_counter() - start)


@dataclass(frozen=True, slots=True)
class Exchange:
    """One gossip round's messages: each peer's decoded delta and weight slice, and each peer's partners."""

    deltas: list[Contribution]
    weights: list[Contribution | None]
    partners: list[set[int]]


def through_codec(
    contribution: Contribution, codec: CodecConfig, encoder: Callable[[str, torch.Tensor], Encoded]
) -> Contribution:
    """The contribution as a partner decodes it; fp32 is lossless, so it skips the round trip."""
    if codec.name == "fp32":
        return contribution
    out = {n: decode(encoder(n, t), codec) for n, t in contribution.tensors.items()}
    return Contribution(contribution.layout, out)


def _clone(params: Params) -> Params:
    return {name: t.clone() for name, t in params.items()}


def corpus_entropy(corpus: Corpus) -> float:
    return unigram_entropy(corpus.train, corpus.vocab_size)
