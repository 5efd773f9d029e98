"""Checkpoints of a running peer: what `murmur run` saves when it stops and resumes from at start.

An adapter between the daemon's `Trainer` and `peer/checkpoint.py` (safetensors + JSON sidecar,
atomic, verified on load). The outer weights phi, the outer rule's buffer (NoLoCo's momentum or
GASLoC's previous y) and the round are always restored; the inner AdamW state and the error-feedback
residuals only when the peer takes the same slice again (they describe that slice's coordinates).
"""

from __future__ import annotations

from pathlib import Path

from peer import checkpoint
from peer.trainer import Trainer
from protocol.logs import get_logger

log = get_logger(__name__)


def save(trainer: Trainer, directory: Path, *, round: int, run_id: str, peer_id: str, version: str,
         tokens_seen: int) -> Path | None:  # fmt: skip
    """Write this peer's state after `round` (blocking); None before the peer has trained at all."""
    if trainer.optimizer is None:
        return None
    state = checkpoint.CheckpointState(
        round=round, slice_index=trainer.slice, run_id=run_id, phi=trainer.phi, momentum=trainer.state,
        inner=trainer.optimizer.state_dict(), feedback=trainer.feedback.state_dict(),
        manifest=trainer.run.to_dict(), peer_id=peer_id, version=version, tokens_seen=tokens_seen,
    )  # fmt: skip
    return checkpoint.save_checkpoint(directory, state)


def restore(trainer: Trainer, directory: Path, *, run_id: str, slice_index: int) -> int | None:
    """Load the newest valid checkpoint of `run_id` into `trainer` (which takes `slice_index`); its round.

    None when there is none: the trainer is left as it was.
    """
    state = checkpoint.load_latest(directory, run_id=run_id, expected_shapes=trainer.shapes)
    if state is None:
        return None
    trainer.adopt(state.phi)
    for name, tensor in state.momentum.items():
        trainer.state[name].copy_(tensor.to(trainer.device))
    trainer.take_slice(slice_index)
    if state.slice_index == slice_index:
        trainer.optimizer.load_state_dict(state.inner)
        trainer.feedback.load_state_dict(state.feedback)
    else:
        log.info("checkpoint trained slice %d, this run takes slice %d: inner state starts afresh",
                 state.slice_index, slice_index)  # fmt: skip
    return state.round
