"""Checkpoints of a running peer: what `murmur run` saves when it stops and resumes from at start.

An adapter between the daemon's `Trainer` and `peer/node/checkpoint.py` (safetensors + JSON sidecar,
atomic, verified on load). The outer weights phi, the outer rule's buffer (NoLoCo's momentum or
GASLoC's previous y) and the round are always restored; the inner AdamW state and the error-feedback
residuals only when the peer takes the same slice again (they describe that slice's coordinates).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from peer.node import checkpoint
from peer.node.trainer import Trainer
from protocol.logs import get_logger

log = get_logger(__name__)


def save(trainer: Trainer, directory: Path, *, round: int, run_id: str, peer_id: str, version: str,
         tokens_seen: int) -> Path | None:  # fmt: skip
    """Write this peer's state after `round` (blocking); None before the peer has trained at all."""
    if trainer.optimizer is None:
        return None
    state = checkpoint.CheckpointState(
        round=round, slice_index=trainer.slice, run_id=run_id, phi=trainer.phi_as_run(), momentum=trainer.state,
        inner=trainer.optimizer.state_dict(), feedback=trainer.feedback.state_dict(),
        manifest=trainer.run.to_dict(), peer_id=peer_id, version=version, tokens_seen=tokens_seen,
    )  # fmt: skip
    return checkpoint.save_checkpoint(directory, state)


def restore(trainer: Trainer, directory: Path, *, run_id: str, slice_index: int) -> int | None:
    """Load the newest valid checkpoint of `run_id` into `trainer` (which takes `slice_index`); its round.

    None when there is none: the trainer is left as it was.
    """
    state = checkpoint.load_latest(directory, run_id=run_id, expected_shapes=trainer.shapes,
                                   expected_dtype=trainer.run.dtype)
    if state is None:
        return None
    trainer.adopt(state.phi)
    for name, tensor in state.momentum.items():
        trainer.state[name].copy_(tensor)  # onto the outer state's device (host memory with --offload-outer)
    trainer.take_slice(slice_index)
    if state.slice_index == slice_index:
        trainer.optimizer.load_state_dict(state.inner)
        trainer.feedback.load_state_dict(state.feedback)
    else:
        log.info("checkpoint trained slice %d, this run takes slice %d: inner state starts afresh",
                 state.slice_index, slice_index)  # fmt: skip
    return state.round


@dataclass(kw_only=True, slots=True)
class Checkpointer:
    """Saves a running peer every `every` rounds as well as on exit: a peer that is killed (SIGKILL, OOM,
    power loss) never gets to save on exit, and would otherwise restart from scratch or from a late join."""

    directory: Path
    every: int
    """Rounds between periodic saves (0: only on exit)."""
    run_id: str
    peer_id: str
    version: str
    _since: int = field(default=0, init=False)

    def save(self, trainer: Trainer, *, round: int, tokens_seen: int) -> Path | None:
        """Save now (blocking); the exit save, and what `after_round` calls when one is due."""
        self._since = 0
        return save(trainer, self.directory, round=round, run_id=self.run_id, peer_id=self.peer_id,
                    version=self.version, tokens_seen=tokens_seen)  # fmt: skip

    def after_round(self, trainer: Trainer, *, round: int, tokens_seen: int) -> Path | None:
        """Count one finished round; save when `every` have passed since the last save. A full or refusing
        disk is logged and training goes on (the next due save tries again): losing the swarm's time over a
        checkpoint would be worse than losing the checkpoint."""
        self._since += 1
        if self.every <= 0 or self._since < self.every:
            return None
        try:
            return self.save(trainer, round=round, tokens_seen=tokens_seen)
        except OSError as exc:
            log.warning("periodic checkpoint of round %d into %s failed, training goes on: %r", round,
                        self.directory, exc)  # fmt: skip
            return None
