"""Validation loss of saved weights: what `murmur eval` and `murmur demo` report.

A checkpoint carries its run's resolved config (`RunConfig.to_dict()`, written by peer/node/resume.py), so
a snapshot is evaluated with exactly the model it was trained as, without the signed manifest or the
swarm. Snapshots are read through `peer/node/checkpoint.py` (safetensors, hashes checked), never pickle.
The held-out windows are the ones the daemon's `eval round N val_loss` lines use (`Trainer.evaluate`:
batch 2 x the run's batch, the same windows every call), so the numbers are comparable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from peer.config import RunConfig
from peer.core.data import Corpus, load_corpus, unigram_entropy
from peer.core.evaluation import DEFAULT_BATCHES, load_weights, val_loss
from peer.core.model import Transformer
from peer.node import checkpoint
from peer.node.checkpoint import CheckpointState
from protocol.errors import CheckpointError
from protocol.logs import get_logger

if TYPE_CHECKING:
    from peer.swarm.membership import Swarm
    from protocol.records import Announcement

log = get_logger(__name__)



@dataclass(frozen=True, slots=True)
class EvalResult:
    """One evaluation: the loss in nats per token, what was evaluated, and on what."""

    loss: float
    round: int
    path: str
    corpus: str
    unigram_entropy: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def to_json(self) -> dict[str, Any]:
        return {"val_loss": self.loss, "perplexity": self.perplexity, "round": self.round, "checkpoint": self.path,
                "corpus": self.corpus, "unigram_entropy": self.unigram_entropy}  # fmt: skip


def run_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Rebuild the RunConfig that `RunConfig.to_dict()` produced (the layout a checkpoint stores).

    `to_dict` nests every dataclass; `from_dict` reads the TOML layout, where `clip` sits in `[outer]`
    and `[model]` overrides the preset. Raises ValueError on anything that is not such a dict.
    """
    try:
        raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
        outer = {**raw.pop("outer", {}), "clip": raw.pop("clip", 0.0)}
        return RunConfig.from_dict({**raw, "outer": outer})
    except (TypeError, AttributeError, KeyError) as err:
        raise ValueError(f"not a run config: {err}") from err


def read_checkpoint(path: Path) -> CheckpointState:
    """The snapshot at `path`: a `round-N` directory, or the newest valid one under a checkpoint directory.

    Raises CheckpointError (a ValueError) saying what is wrong; snapshots that fail their checks are
    skipped with a warning when a whole directory is given, as on resume.
    """
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / checkpoint.META_NAME).exists() or path in checkpoint.list_checkpoints(path.parent):
        return checkpoint.verify_checkpoint(path, run_id=_run_id_of(path))  # one round-N folder, whole or not
    snapshots = checkpoint.list_checkpoints(path)
    if not snapshots:
        raise CheckpointError(f"{path}: no round-N checkpoint in it")
    for snapshot in snapshots:
        try:
            return checkpoint.verify_checkpoint(snapshot, run_id=_run_id_of(snapshot))
        except CheckpointError as err:
            log.warning("skipping checkpoint %s: %s", snapshot, err)
    raise CheckpointError(f"{path}: none of its {len(snapshots)} checkpoint(s) is valid (see the warnings)")


def _run_id_of(snapshot: Path) -> str:
    """The run id its sidecar names; verify_checkpoint then checks the whole snapshot against it."""
    meta = snapshot / checkpoint.META_NAME
    try:
        if meta.stat().st_size > checkpoint.MAX_META_BYTES:
            raise CheckpointError(f"{meta}: larger than {checkpoint.MAX_META_BYTES} bytes")
        run_id = json.loads(meta.read_text()).get("run_id")
    except FileNotFoundError as err:
        raise CheckpointError(f"{snapshot}: {checkpoint.META_NAME} is missing (an incomplete snapshot?)") from err
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{meta}: unreadable: {err}") from err
    if not isinstance(run_id, str):
        raise CheckpointError(f"{meta}: no run_id")
    return run_id


def model_for(run: RunConfig, weights: Mapping[str, torch.Tensor]) -> Transformer:
    """The run's model holding `weights`; ValueError when names or shapes do not match it."""
    model = Transformer(run.model)
    params = dict(model.named_parameters())
    if set(params) != set(weights):
        missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        raise ValueError(f"weights do not fit the run's model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, p in params.items():
        if tuple(weights[name].shape) != tuple(p.shape):
            raise ValueError(f"{name}: shape {tuple(weights[name].shape)}, the model has {tuple(p.shape)}")
    return load_weights(model, weights)


def corpus_for(run: RunConfig, data: str | Path | None = None) -> Corpus:
    """The corpus the run trains on (the embedded one by default), or `data` instead; its `val` is the held-out data.

    The one place `murmur eval`, the demo and the live eval get held-out tokens from. A run on a prepared dataset
    evaluates on its held-out shard (fetched into the cache, checked against the manifest's dataset id), or on
    `data`'s when `data` is a prepared folder; its Corpus has no training tokens."""
    from peer.core.fetch import heldout_corpus, open_dataset
    from peer.core.shards import INDEX_NAME

    if data is not None and (Path(data) / INDEX_NAME).is_file():
        dataset, fetcher = open_dataset(str(data), run.data.dataset_id or None)
        return heldout_corpus(dataset, fetcher, str(data))
    if data is None and run.data.prepared:
        dataset, fetcher = open_dataset(run.data.location, run.data.dataset_id)
        return heldout_corpus(dataset, fetcher, run.data.location)
    if data is None and run.data.source not in ("embedded", "default"):
        data = run.data.source
    return load_corpus(data)


def evaluate_weights(run: RunConfig, weights: Mapping[str, torch.Tensor], corpus: Corpus,
                     batches: int = DEFAULT_BATCHES, device: torch.device | str = "cpu") -> float:  # fmt: skip
    """Validation loss of full-model `weights` of `run` on `corpus`, computed on `device`."""
    model = model_for(run, weights).to(device)
    return val_loss(model, corpus, seq_len=run.model.seq_len, batch_size=run.inner.batch_size * 2, batches=batches,
                    device=device)  # fmt: skip


def evaluate_checkpoint(path: Path, *, manifest: Path | None = None, data: str | Path | None = None,
                        batches: int = DEFAULT_BATCHES, device: torch.device | str = "cpu") -> EvalResult:  # fmt: skip
    """Evaluate the phi of the snapshot at `path` with the run config it stores (or `manifest`'s).

    `manifest` is a `create-run --out` file (for snapshots written without a config). Raises
    CheckpointError or ValueError with a message meant for the user.
    """
    state = read_checkpoint(path)
    if manifest is not None:
        run = run_from_manifest_file(manifest)
    elif state.manifest:
        run = run_from_dict(state.manifest)
    else:
        raise ValueError(f"{state.path}: the checkpoint stores no run config; pass --manifest")
    corpus = corpus_for(run, data)
    loss = evaluate_weights(run, state.phi, corpus, batches, device)
    entropy = unigram_entropy(corpus.val, corpus.vocab_size)
    return EvalResult(loss=loss, round=state.round, path=str(state.path), corpus=corpus.name, unigram_entropy=entropy)


def run_from_manifest_file(path: Path) -> RunConfig:
    """The RunConfig of a signed manifest file written by `murmur create-run --out` (signature checked)."""
    from protocol.manifest import load_json

    return RunConfig.from_manifest(load_json(path).manifest)


@dataclass(frozen=True, slots=True)
class LiveWeights:
    """A live peer's outer weights, as a late joiner gets them (signature and content hash checked)."""

    run: RunConfig
    sender: str
    round: int
    phi: dict[str, torch.Tensor]


LIVE_TIMEOUT_S = 120.0
"""`murmur eval --swarm`'s default bound on finding the swarm and fetching a live peer's weights."""


def fetch_live_weights(swarm: str, initial_peers: tuple[str, ...], *, run_key: bytes, peer: str | None = None,
                       timeout_s: float = LIVE_TIMEOUT_S) -> LiveWeights:  # fmt: skip
    """Download the weights a live peer of `swarm` serves to late joiners (peer/node/latejoin.py).

    The manifest must be signed by `run_key`; the pin store is a throwaway one, so evaluating never
    pins an owner for this user's later joins. `peer` (a peer id or its prefix) picks the donor,
    otherwise a random one that has trained. `timeout_s` bounds the whole: the DHT start, the manifest, the
    donors and their downloads share it, and each step says on stderr what it waits on (a loaded machine made
    a silent eval look hung). Raises MurmurError or ValueError with a message for the user.
    """
    import asyncio
    import tempfile
    import time

    from peer.core.slices import parameter_shapes
    from peer.node.latejoin import fetch_initial_state
    from peer.swarm.join import swarm_view
    from protocol.dht import startup_timeout_within
    from protocol.errors import MurmurError
    from protocol.identity import Identity
    from protocol.manifest import PinStore

    started = time.monotonic()
    deadline = started + timeout_s

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    log.info("eval: joining swarm %s through %d initial peer(s) as a DHT client (%.0f s for all of it)", swarm,
             len(initial_peers), timeout_s)  # fmt: skip
    with swarm_view(swarm, initial_peers, timeout_s=startup_timeout_within(timeout_s)) as found:
        log.info("eval: DHT up after %.1f s; looking up the run's signed manifest", time.monotonic() - started)
        with tempfile.TemporaryDirectory() as pins:
            signed = found.fetch_manifest(run_key=run_key, pins=PinStore(Path(pins) / "pins.json"), timeout_s=left())
        run = RunConfig.from_manifest(signed.manifest)
        while True:  # a peer serves a snapshot only every few rounds: a young swarm may have none yet
            donors = _find_donors(found, signed.run_id, peer, wait_s=min(left(), LIVE_PEERS_WAIT_S))
            if not donors:
                who = f"peer {peer}" if peer else "peer"
                raise MurmurError(f"swarm {swarm}: no live {who} that accepts connections and has trained a round")
            log.info("eval: asking %d live peer(s) for their weights: %s", len(donors),
                     ", ".join(d.peer_id[:16] for d in donors))  # fmt: skip
            state = asyncio.run(fetch_initial_state(donors, identity=Identity.generate(), run_id=signed.run_id,
                                                    shapes=parameter_shapes(run.model), timeout_s=left()))  # fmt: skip
            if state is not None:
                log.info("eval: round %d weights of peer %s after %.1f s", state.round, state.sender[:16],
                         time.monotonic() - started)  # fmt: skip
                return LiveWeights(run=run, sender=state.sender, round=state.round, phi=state.tensors)
            if time.monotonic() + RETRY_S >= deadline:
                raise MurmurError(f"swarm {swarm}: no donor delivered its weights within {timeout_s:.0f} s "
                                  "(see the warnings)")  # fmt: skip
            time.sleep(RETRY_S)


RETRY_S = 2.0
"""Between two rounds of asking the live donors for their weights (`fetch_live_weights`)."""


LIVE_PEERS_WAIT_S = 10.0
"""A fresh DHT client sees the manifest before the peer records (`murmur status` waits too)."""


def _find_donors(swarm: Swarm, run_id: str, peer: str | None, *, wait_s: float) -> list[Announcement]:
    """Donors among the live peers (only `peer`, a peer id or prefix, when given), polled until some appear."""
    import random
    import time

    from peer.node.latejoin import choose_donors

    deadline = time.monotonic() + wait_s
    while True:
        live = swarm.live_peers(run_id=run_id)
        if peer is not None:
            live = [p for p in live if p.peer_id.startswith(peer.lower())]
        donors = choose_donors(live, me="", rng=random.Random())
        if donors or time.monotonic() >= deadline:
            return donors
        time.sleep(1.0)
