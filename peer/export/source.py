"""What a checkpoint holds for use outside training: the run's model, its outer weights, and its tokenizer.

Which weights leave murmur: a snapshot (peer/node/checkpoint.py) keeps phi, the outer weights after the peer's
last outer step, beside optimiser state only (the outer rule's momentum, the slice's inner AdamW moments, the
codec's error-feedback residuals). The inner weights theta of a round are never saved: they are one peer's
H local steps on one slice, before its partners' updates. phi is the model: late joiners download it, the
daemon's `eval` lines and `murmur eval` score it. In a gossip run every peer holds its own copy of the
consensus, a fraction of a round apart; several peers' snapshots of one run are averaged coordinate-wise
(what the demo scores as "the averaged weights"), the closest thing to the swarm's consensus on disk.

The tokenizer is the manifest's: byte level (vocab 256, no file) or a `tokenizer.json` that the manifest
names by its SHA-256 only, so the user hands over the file and its hash must match the run's.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from peer.config import RunConfig
from peer.core.evaluation import average_weights
from peer.core.model import Transformer
from peer.core.tokenizers import ByteTokenizer, JsonTokenizer, Tokenizer
from peer.lab.evaluate import model_for, read_checkpoint, run_from_dict
from protocol.errors import CheckpointError, ExportError
from protocol.logs import get_logger

log = get_logger(__name__)

BYTE_TOKENIZERS = ("bytes", "byte", "")
"""What a run's `[data] tokenizer` says for byte-level tokens (empty: a manifest from before the field)."""
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True, slots=True)
class Trained:
    """A run's trained model as it leaves murmur: config, full-model weights, tokenizer and provenance."""

    run: RunConfig
    phi: dict[str, torch.Tensor]
    """Full-model outer weights, CPU, fp32, keyed as `Transformer.named_parameters()`."""
    tokenizer: Tokenizer
    tokenizer_file: Path | None
    """The run's tokenizer.json; None for byte level."""
    run_id: str
    rounds: tuple[int, ...]
    paths: tuple[str, ...]
    """The snapshot each phi came from (several when averaged)."""

    def model(self, device: torch.device | str = "cpu") -> Transformer:
        """murmur's own model holding these weights, in eval mode."""
        return model_for(self.run, self.phi).to(device)


def load_trained(checkpoints: Sequence[Path], *, tokenizer: Path | None = None) -> Trained:
    """The model of one snapshot, or the coordinate-wise mean of several snapshots' phi of the same run.

    Each path is a `round-N` folder or a peer's checkpoint folder (its newest valid snapshot). Raises
    CheckpointError or ExportError (both ValueErrors) with a one-line message for the user.
    """
    if not checkpoints:
        raise ExportError("no checkpoint given")
    states = [read_checkpoint(Path(path)) for path in checkpoints]
    first = states[0]
    if not first.manifest:
        raise CheckpointError(f"{first.path}: the checkpoint stores no run config (written by an older murmur)")
    for state in states[1:]:
        if state.run_id != first.run_id:
            raise ExportError(f"{state.path} is of run {state.run_id}, {first.path} of run {first.run_id}: "
                              "only one run's checkpoints can be averaged")  # fmt: skip
    try:
        run = run_from_dict(first.manifest)
    except ValueError as err:
        raise CheckpointError(f"{first.path}: its run config does not parse: {err}") from err
    phi = first.phi if len(states) == 1 else average_weights([s.phi for s in states])
    if len(states) > 1:
        log.info("averaging phi of %d snapshots of run %s", len(states), first.run_id)
    tok, tok_file = run_tokenizer(run, tokenizer)
    return Trained(run=run, phi=phi, tokenizer=tok, tokenizer_file=tok_file, run_id=first.run_id,
                   rounds=tuple(s.round for s in states), paths=tuple(str(s.path) for s in states))  # fmt: skip


def run_tokenizer(run: RunConfig, path: Path | None) -> tuple[Tokenizer, Path | None]:
    """The run's tokenizer: bytes, or the tokenizer.json at `path` once its SHA-256 matches the run's."""
    named = run.data.tokenizer
    if named in BYTE_TOKENIZERS:
        if path is not None:
            raise ExportError(f"the run is byte level (vocab 256); --tokenizer {path} is not its tokenizer")
        if run.model.vocab_size < 256:
            raise ExportError(f"the run is byte level but its model has vocab_size={run.model.vocab_size} < 256")
        return ByteTokenizer(), None
    if not _SHA256.match(named):
        raise ExportError(f"the run names tokenizer {named!r}, which is neither 'bytes' nor a SHA-256")
    if path is None:
        raise ExportError(f"the run trained with a tokenizer.json (SHA-256 {named[:12]}...): pass --tokenizer FILE")
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as err:
        raise ExportError(f"--tokenizer {path}: {err.strerror or err}") from err
    if digest != named.lower():
        raise ExportError(f"--tokenizer {path} has SHA-256 {digest[:12]}..., the run's is {named[:12]}...")
    tok = JsonTokenizer(path)
    if tok.vocab_size > run.model.vocab_size:
        raise ExportError(f"--tokenizer {path} has {tok.vocab_size} tokens, the model only {run.model.vocab_size}")
    return tok, path
