"""What one peer computes, apart from the network: model, data, slice optimiser, outer state, codec.

Everything here is blocking tensor work; the daemon (`peer/node/daemon.py`) calls it from a worker thread,
one call at a time, so the event loop keeps serving partners while a round trains.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from peer.config import RunConfig
from peer.core.data import TokenStream, load_corpus, stream_index_for
from peer.core.devices import fit_inner
from peer.core.evaluation import DEFAULT_BATCHES, load_weights, val_loss
from peer.core.fetch import DatasetFetcher, FetchStopped, heldout_corpus, num_streams, open_dataset
from peer.core.inner import InnerConfig, SliceOptimizer, inner_round
from peer.core.model import Transformer
from peer.core.outer import initial_state
from peer.core.robust import Clipper, ClipReport
from peer.core.shards import INDEX_NAME, PreparedDataset, ShardStream
from peer.core.slices import Contribution, parameter_shapes, partition, pseudo_gradient, slice_numel
from peer.node.gossip import compose_outer_step, encode_update
from protocol.codec import ErrorFeedback
from protocol.errors import DataError, DataNotFound, MurmurError
from protocol.logs import get_logger
from protocol.updates import OutgoingUpdate, ReceivedUpdate, StateSnapshot, make_state_snapshot

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

    def __init__(self, run: RunConfig, peer_id: str, device: torch.device, *, data: str | None = None,
                 micro_batch: int | None = None, grad_accum: int | None = None,
                 halt: threading.Event | None = None) -> None:  # fmt: skip
        """`halt` (SIGTERM) ends a wait for a dataset's server: FetchStopped."""
        self.run, self.device = run, device
        torch.manual_seed(run.data.seed)  # every peer starts from the same phi
        self.model = Transformer(run.model).to(device)
        self.phi = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        self.state = initial_state(self.phi, run.outer)
        self.shapes = parameter_shapes(run.model)
        self.layouts = partition(run.model, run.slices)
        self.inner = _inner_config(run, micro_batch, grad_accum, device,
                                   max(slice_numel(layout, self.shapes) for layout in self.layouts))  # fmt: skip
        self.dataset: PreparedDataset | None = None
        self.fetcher: DatasetFetcher | None = None
        self._prefetch: threading.Thread | None = None
        self.stream: TokenStream | ShardStream
        if _prepared(run, data):
            self._open_prepared(run, peer_id, data, halt)
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

    def _open_prepared(self, run: RunConfig, peer_id: str, data: str | None, halt: threading.Event | None) -> None:
        """A prepared dataset: the manifest's location (fetched into the cache, shards as rounds reach them) or
        a local copy given as --data. S comes from the index and the manifest only (`num_streams`), so every
        peer of the run cuts the data alike and streams stay disjoint whatever each one's micro-batch."""
        location = data if data is not None else run.data.location
        self.dataset, self.fetcher = open_dataset(location, run.data.dataset_id or None, halt)
        if self.dataset.index.vocab_size != run.model.vocab_size:
            raise DataError(f"the dataset at {location} has {self.dataset.index.vocab_size} tokens, the model "
                            f"{run.model.vocab_size}")  # fmt: skip
        seq_len = run.model.seq_len
        streams = num_streams(self.dataset.windows(seq_len),
                              run.inner.steps_per_round * run.inner.batch_size * run.inner.grad_accum)
        self.stream = self.dataset.stream(
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
            self.fetcher.ensure(self.stream.shards_for_round(round, self.inner.batch_size), halt)
        except FetchStopped as exc:
            raise Halted(str(exc)) from None
        upcoming = self.stream.shards_for_round(round + 1, self.inner.batch_size)
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

        stats = inner_round(self.model, self.optimizer, batches, self.device)
        theta = {name: p.detach() for name, p in self.model.named_parameters()}
        delta = pseudo_gradient(self.phi, theta, self.layouts[self.slice])
        update, own = encode_update(round, self.slice, delta, self.phi, self.layouts, self.feedback)
        return TrainedRound(update, own, stats.mean_loss, stats.tokens)

    def outer_step(self, own: Contribution, updates: list[ReceivedUpdate]) -> ClipReport:
        return compose_outer_step(self.phi, self.state, own, updates, self.layouts, self.run.outer, self.clipper)

    def adopt(self, weights: dict[str, torch.Tensor]) -> None:
        """Start from a donor's outer weights (late join); the outer rule's buffer restarts from them."""
        for name, tensor in weights.items():
            self.phi[name].copy_(tensor.to(self.device))
        self.state = initial_state(self.phi, self.run.outer)

    @torch.no_grad()
    def evaluate(self, batches: int = DEFAULT_BATCHES, weights: Mapping[str, torch.Tensor] | None = None) -> float:
        """Validation loss of phi (or of `weights`, phi untouched: a late joiner's candidates) on the same
        held-out windows every time (comparable across peers)."""
        load_weights(self.model, self.phi if weights is None else weights)
        return val_loss(self.model, self.corpus, seq_len=self.run.model.seq_len, batch_size=self.inner.batch_size * 2,
                        batches=batches, device=self.device)  # fmt: skip

    def snapshot(self, round: int) -> StateSnapshot:
        """phi, encoded for late joiners (blocking)."""
        return make_state_snapshot(round, self.phi)


def _inner_config(run: RunConfig, micro_batch: int | None, grad_accum: int | None = None,
                  device: torch.device = torch.device("cpu"), trainable_params: int = 0) -> InnerConfig:  # fmt: skip
    """The manifest's inner config with the run's batch split as the flags say, or fitted to a GPU's free
    memory (peer/core/devices.py); every split keeps the run's batch per optimiser step."""
    return fit_inner(run.inner, run.model, device, micro_batch=micro_batch, grad_accum=grad_accum,
                     trainable_params=trainable_params)  # fmt: skip


def _prepared(run: RunConfig, data: str | None) -> bool:
    """Whether this peer trains on a prepared dataset: --data names a prepared folder, or no --data and the
    manifest names one."""
    if data is not None:
        return (Path(data) / INDEX_NAME).is_file()
    return run.data.prepared
