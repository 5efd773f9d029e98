"""What one peer computes, apart from the network: model, data, slice optimiser, outer state, codec.

Everything here is blocking tensor work; the daemon (`peer/node/daemon.py`) calls it from a worker thread,
one call at a time, so the event loop keeps serving partners while a round trains.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from peer.config import RunConfig
from peer.core.data import TokenStream, load_corpus, stream_index_for
from peer.core.devices import fit_inner
from peer.core.evaluation import DEFAULT_BATCHES, load_weights, val_loss
from peer.core.fetch import DatasetFetcher, FetchStopped, heldout_corpus, num_streams, open_dataset
from peer.core.fetch_peers import PeerList, stream_for_round
from peer.core.inner import InnerConfig, SliceOptimizer, inner_round
from peer.core.model import DTYPES, Transformer, cast_parameters
from peer.core.outer import initial_state
from peer.core.robust import Clipper, ClipReport
from peer.core.shards import INDEX_NAME, PreparedDataset, ShardStream
from peer.core.slices import Contribution, parameter_shapes, partition
from peer.node.gossip import compose_outer_step, encode_update
from protocol.codec import ErrorFeedback
from protocol.errors import DataError, DataNotFound, MurmurError
from protocol.logs import get_logger
from protocol.updates import OutgoingUpdate, ReceivedUpdate, StateSnapshot, make_state_snapshot

if TYPE_CHECKING:
    from peer.node.ranks import Ranks

log = get_logger(__name__)


class Halted(Exception):
    """Raised inside the inner loop when SIGTERM/SIGINT arrived: the round is abandoned after this step."""


@dataclass(frozen=True, slots=True)
class TrainedRound:
    """What one inner round produced: the update to send, the delta as sent, and its statistics."""

    update: OutgoingUpdate
    own: Contribution
    loss: float
    tokens: int


class Trainer:
    """Model, data, slice optimiser, outer state and error feedback of one peer. Blocking: use it from
    the training thread (one call at a time)."""

    ranks: Ranks | None = None
    """The worker processes of a multi-GPU peer (`murmur run --gpus N`); None: this process trains alone."""

    def __init__(self, run: RunConfig, peer_id: str, device: torch.device, *, data: str | None = None,
                 micro_batch: int | None = None, grad_accum: int | None = None,
                 halt: threading.Event | None = None, offload_outer: bool = False,
                 checkpointing: bool = False, peers: PeerList | None = None) -> None:  # fmt: skip
        """`halt` (SIGTERM) ends a wait for a dataset's server: FetchStopped. `offload_outer` keeps phi and the
        outer state in host memory (pinned with CUDA) and takes the outer step there; `checkpointing`
        recomputes activations per block (`murmur run --offload-outer --activation-checkpointing`)."""
        self.run, self.device = run, device
        torch.manual_seed(run.data.seed)  # every peer starts from the same phi
        self.model = Transformer(run.model)
        if run.dtype != "float32":
            cast_parameters(self.model, run.dtype)  # bf16 on the device; fp32 masters of the slice only
        self.model.to(device)
        self.model.checkpointing = checkpointing
        self.offload_outer = offload_outer
        self.outer_device = torch.device("cpu") if offload_outer else device
        """Where phi and the outer state live: the training device, or host memory (--offload-outer)."""
        # phi is fp32 whatever the run dtype: bf16 rounding lost its small late-training steps (benchmarks/README,
        # peer_memory: 20 simulated rounds); a bf16 run still sends, serves and saves it as bf16 (`phi_as_run`)
        self.phi = {name: self._outer_tensor(p.detach().float()) for name, p in self.model.named_parameters()}
        self.state = self._initial_state()
        self.shapes = parameter_shapes(run.model)
        self.layouts = partition(run.model, run.slices)
        self.inner = _inner_config(run, micro_batch, grad_accum, device, checkpointing=checkpointing,
                                   offload_outer=offload_outer)  # fmt: skip
        self.dataset: PreparedDataset | None = None
        self.fetcher: DatasetFetcher | None = None
        self._prefetch: threading.Thread | None = None
        self.stream: TokenStream | ShardStream
        if _prepared(run, data):
            self._open_prepared(run, peer_id, data, halt, peers)
        else:
            self._load_corpus(run, peer_id, data)
        self.slice = -1
        self.optimizer: SliceOptimizer | None = None
        self.feedback = ErrorFeedback(run.codec)
        self.clipper = Clipper(run.clip)
        """Running norm of own deltas: the bound on partners' terms (peer/core/robust.py)."""

    def _load_corpus(self, run: RunConfig, peer_id: str, data: str | None) -> None:
        """A text corpus (the embedded one, or a path every peer has), tokenised in memory."""
        source = data if data is not None else (None if run.data.source in ("embedded", "default") else run.data.source)
        if data is None and run.data.tokenizer != "bytes":  # the manifest's tokenizer is never silently ignored
            raise DataError(f"the run's [data] tokenizer is {run.data.tokenizer[:16]}..., but a [data] source is read "
                            "byte-level; give --data a prepared copy of the run's dataset")  # fmt: skip
        try:
            corpus = self.corpus = load_corpus(source)
        except DataNotFound as exc:
            if data is not None:
                raise
            raise DataNotFound(f"{exc} (the run's [data] source); give --data PATH with a local copy") from exc
        windows = corpus.train.numel() // (run.model.seq_len + 1)
        num_streams = max(1, min(1024, windows // (2 * self.inner.batch_size)))
        self.stream = TokenStream(
            corpus.train, run.model.seq_len, stream_index=stream_index_for(bytes.fromhex(peer_id), num_streams),
            num_streams=num_streams, steps_per_round=self.inner.steps_per_round * self.inner.grad_accum,
            seed=run.data.seed,
        )  # fmt: skip

    def _open_prepared(self, run: RunConfig, peer_id: str, data: str | None, halt: threading.Event | None,
                       peers: PeerList | None = None) -> None:  # fmt: skip
        """A prepared dataset: the manifest's location (fetched into the cache, shards as rounds reach them) or
        a local copy given as --data. S comes from the index and the manifest only (`num_streams`), so every
        peer of the run cuts the data alike and streams stay disjoint whatever each one's micro-batch."""
        location = data if data is not None else run.data.location
        self.dataset, self.fetcher = open_dataset(location, run.data.dataset_id or None, halt, peers=peers)
        if self.dataset.index.vocab_size != run.model.vocab_size:
            raise DataError(f"the dataset at {location} has {self.dataset.index.vocab_size} tokens, the model "
                            f"{run.model.vocab_size}")  # fmt: skip
        if data is None and self.dataset.index.tokenizer != run.data.tokenizer:
            raise DataError(f"the dataset at {location} was tokenised with {self.dataset.index.tokenizer[:16]}, the "
                            f"run's [data] tokenizer is {run.data.tokenizer[:16]}")  # fmt: skip
        seq_len = run.model.seq_len
        streams = num_streams(self.dataset.windows(seq_len),
                              run.inner.steps_per_round * run.inner.batch_size * run.inner.grad_accum)
        self.own_stream = self.stream = self.dataset.stream(
            seq_len, stream_index=stream_index_for(bytes.fromhex(peer_id), streams), num_streams=streams,
            steps_per_round=self.inner.steps_per_round * self.inner.grad_accum, seed=run.data.seed,
        )  # fmt: skip
        self.corpus = heldout_corpus(self.dataset, self.fetcher, location, halt)

    def _fetch_for(self, round: int, halt: threading.Event) -> None:
        """The shards round `round` reads, on disk and verified (blocking: the trainer's thread, never the event
        loop); then round + 1's, fetched in a thread while this round trains."""
        if self.fetcher is None:
            return
        assert isinstance(self.stream, ShardStream)
        if self._prefetch is not None:
            self._prefetch.join()  # it may be fetching this round's shards: let it finish them
        try:
            self.stream = stream_for_round(self.fetcher, self.own_stream, round, self.inner.batch_size, halt)
        except FetchStopped as exc:
            raise Halted(str(exc)) from None
        upcoming = self.own_stream.shards_for_round(round + 1, self.inner.batch_size)
        self._prefetch = threading.Thread(target=self._prefetch_quietly, args=(upcoming, halt), daemon=True,
                                          name="murmur-prefetch")  # fmt: skip
        self._prefetch.start()

    def _prefetch_quietly(self, names: list[str], halt: threading.Event) -> None:
        """Prefetch: a failure here is said again, as the error, by the next round's own fetch."""
        assert self.fetcher is not None
        try:
            self.fetcher.ensure(names, halt)
        except (MurmurError, OSError) as exc:
            log.debug("prefetch of %s failed: %s", names, exc, exc_info=True)

    def take_slice(self, index: int) -> None:
        """Train slice `index` from now on: fresh optimiser state and error feedback for it."""
        if self.optimizer is not None:
            self.optimizer.close()
        self.optimizer = SliceOptimizer(self.model, self.layouts[index], self.inner)
        self.feedback = ErrorFeedback(self.run.codec)
        self.slice = index

    def train_round(self, round: int, halt: threading.Event) -> TrainedRound:
        """H inner steps from phi, then the encoded pseudo-gradient. Raises Halted when `halt` is set."""
        assert self.optimizer is not None, "take_slice first"
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(self.phi[name])
        self._fetch_for(round, halt)
        accum, batch = self.inner.grad_accum, self.inner.batch_size
        H = self.inner.steps_per_round

        def batches(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
            if halt.is_set():
                raise Halted(f"stopped during round {round}")
            return self.stream.batch(round, (step % H) * accum + micro, batch)

        if self.ranks is not None:  # --gpus N: every micro-batch split over N processes (peer/node/ranks.py)
            stats = self.ranks.inner_round(self.slice, self.model, self.optimizer, batches, self.device, self.phi)
        else:
            stats = inner_round(self.model, self.optimizer, batches, self.device, start=self.phi)
        layout = self.layouts[self.slice]
        packed = self.optimizer.pseudo_gradient(self.phi)  # fp32, from the masters under bf16
        delta = Contribution(layout, {name: packed[name] for name in layout})
        update, own = encode_update(round, self.slice, delta, self.phi, self.layouts, self.feedback)
        return TrainedRound(update, own, stats.mean_loss, stats.tokens)

    def outer_step(self, own: Contribution, updates: list[ReceivedUpdate]) -> ClipReport:
        """The outer step where phi lives (host memory with --offload-outer): own delta moved there first."""
        if self.outer_device != self.device:
            own = replace(own, tensors={name: t.to(self.outer_device) for name, t in own.tensors.items()})
        return compose_outer_step(self.phi, self.state, own, updates, self.layouts, self.run.outer, self.clipper)

    def adopt(self, weights: dict[str, torch.Tensor]) -> None:
        """Start from a donor's outer weights (late join); the outer rule's buffer restarts from them."""
        for name, tensor in weights.items():
            self.phi[name].copy_(tensor)  # to phi's device and dtype (a bf16 run's phi rounds fp32 weights)
        self.state = self._initial_state()

    def _outer_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of `tensor` where the outer state lives; pinned host memory when offloaded next to CUDA, so
        that copying phi into the model each round is a DMA, not a pageable copy."""
        out = tensor.to(self.outer_device, copy=True)
        if self.outer_device.type == "cpu" and self.device.type == "cuda":
            out = out.pin_memory()
        return out

    def _initial_state(self) -> dict[str, torch.Tensor]:
        """The outer rule's buffer (fp32) next to phi."""
        state = initial_state(self.phi, self.run.outer)
        if self.outer_device.type == "cpu" and self.device.type == "cuda":
            state = {name: t.pin_memory() for name, t in state.items()}
        return state

    @torch.no_grad()
    def evaluate(self, batches: int = DEFAULT_BATCHES, weights: Mapping[str, torch.Tensor] | None = None) -> float:
        """Validation loss of phi (or of `weights`, phi untouched: a late joiner's candidates) on the same
        held-out windows every time (comparable across peers)."""
        load_weights(self.model, self.phi if weights is None else weights)
        return val_loss(self.model, self.corpus, seq_len=self.run.model.seq_len, batch_size=self.inner.batch_size * 2,
                        batches=batches, device=self.device)  # fmt: skip

    def snapshot(self, round: int) -> StateSnapshot:
        """phi, encoded for late joiners (blocking)."""
        return make_state_snapshot(round, self.phi_as_run())

    def phi_as_run(self) -> dict[str, torch.Tensor]:
        """phi in the run's dtype: what FetchState serves and checkpoints hold (bf16 for a bfloat16 run; phi
        itself, no copy, for float32)."""
        dtype = DTYPES[self.run.dtype]
        return {name: t.to(dtype) for name, t in self.phi.items()}


def _inner_config(run: RunConfig, micro_batch: int | None, grad_accum: int | None = None,
                  device: torch.device = torch.device("cpu"), *, checkpointing: bool = False,
                  offload_outer: bool = False) -> InnerConfig:  # fmt: skip
    """The manifest's inner config with the run's batch split as the flags say, or fitted to a GPU's free
    memory by the planner (peer/core/devices.py, peer/core/planner.py: this run's slices and dtype, and this
    peer's checkpointing and offload); every split keeps the run's batch per optimiser step."""
    return fit_inner(run.inner, run.model, device, micro_batch=micro_batch, grad_accum=grad_accum, slices=run.slices,
                     dtype=run.dtype, checkpointing=checkpointing, offload_outer=offload_outer)  # fmt: skip


def _prepared(run: RunConfig, data: str | None) -> bool:
    """Whether this peer trains on a prepared dataset: --data names a prepared folder, or no --data and the
    manifest names one."""
    if data is not None:
        return (Path(data) / INDEX_NAME).is_file()
    return run.data.prepared
