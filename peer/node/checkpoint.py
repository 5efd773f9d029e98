"""Safe, atomic, resumable checkpoints of one peer: safetensors files plus a JSON sidecar, never pickle.

Why not `torch.save`: `torch.load` of a file that a download, a partner or a stranger's disk produced
runs arbitrary code (pickle). safetensors is a length-prefixed JSON header plus raw bytes, so a hostile
file can at worst fail to parse; the sidecar is plain JSON.

On-disk layout (one directory per snapshot, named by its outer round)::

    <directory>/
      round-000123/
        meta.json              round, slice, run id, manifest, peer id, version, tokens, wall time,
                               and {file: {sha256, bytes}} for every tensor file below
        phi.safetensors        outer weights (full model), in the run's dtype (bf16 for a bfloat16 run)
        momentum.safetensors   outer optimiser state (same names as phi), float32 whatever the run's dtype
        inner.safetensors      the slice's inner AdamW state (SliceOptimizer.state_dict())
        feedback.safetensors   error-feedback residuals (ErrorFeedback.state_dict())
      .tmp-round-000124-<pid>-<hex>/   a write in progress (or one a crash left behind): never loaded

One file per group rather than one file with prefixed names: phi and momentum share every name, and
separate files keep each group exactly as its owner's `state_dict()` spelled it (no prefix parsing, no
name collisions with names that contain dots), and let a reader check or load one group alone.

Atomicity: every file is written and fsync'd inside a `.tmp-*` directory, meta.json (holding the
hashes) last; the directory is fsync'd and `os.replace`-d to `round-N`, then the parent is fsync'd.
A crash at any point leaves either the old set of snapshots or the old set plus a complete new one.
Older snapshots are pruned only after the new one is in place.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peer.node.rounds import MAX_ROUND
from protocol.errors import CheckpointError
from protocol.files import fsync_path, replace_directory, sha256_file
from protocol.logs import get_logger

log = get_logger(__name__)

FORMAT_VERSION = 1
GROUPS = ("phi", "momentum", "inner", "feedback")
META_NAME = "meta.json"
MAX_META_BYTES = 16 * 2**20
"""A sidecar is a few KiB (the manifest dominates); refuse to parse anything absurdly larger."""
_DIR_PATTERN = re.compile(r"^round-(\d{6,})$")
_LEFTOVER_PATTERN = re.compile(r"^\.(?:tmp|old)-round-\d+-(\d+)-[0-9a-f]{8}$")

Tensors = dict[str, torch.Tensor]


@dataclass(kw_only=True, slots=True)
class CheckpointState:
    """Everything a peer needs to continue where it stopped.

    `phi` and `momentum` map parameter names to full tensors; `inner` and `feedback` are the
    `state_dict()`s of `SliceOptimizer` and `ErrorFeedback`. `path` is set by `load_latest` only.
    """

    round: int
    slice_index: int
    run_id: str
    phi: Tensors
    momentum: Tensors
    inner: Tensors = field(default_factory=dict)
    feedback: Tensors = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    peer_id: str = ""
    version: str = ""
    tokens_seen: int = 0
    wall_time: float = 0.0
    """Seconds this peer has trained in total (not a timestamp)."""
    path: Path | None = None

    def __post_init__(self) -> None:
        if isinstance(self.round, bool) or not isinstance(self.round, int) or not 0 <= self.round <= MAX_ROUND:
            raise ValueError(f"round must be an int in [0, {MAX_ROUND}], got {self.round!r}")
        if isinstance(self.slice_index, bool) or not isinstance(self.slice_index, int) or self.slice_index < 0:
            raise ValueError(f"slice_index must be an int >= 0, got {self.slice_index!r}")
        if not re.fullmatch(r"[0-9a-f]+", self.run_id or ""):
            raise ValueError(f"run_id must be lower-case hex, got {self.run_id!r}")
        if isinstance(self.tokens_seen, bool) or not isinstance(self.tokens_seen, int) or self.tokens_seen < 0:
            raise ValueError(f"tokens_seen must be an int >= 0, got {self.tokens_seen!r}")
        if not math.isfinite(self.wall_time) or self.wall_time < 0:
            raise ValueError(f"wall_time must be finite and >= 0, got {self.wall_time!r}")

    def groups(self) -> dict[str, Tensors]:
        return {"phi": self.phi, "momentum": self.momentum, "inner": self.inner, "feedback": self.feedback}


def checkpoint_name(round_: int) -> str:
    return f"round-{round_:06d}"


def list_checkpoints(directory: Path) -> list[Path]:
    """Snapshot directories newest round first (in-progress `.tmp-*` directories are not listed)."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _DIR_PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, key=lambda item: item[0], reverse=True)]


# ---------------------------------------------------------------------------------------------- save


def save_checkpoint(directory: Path, state: CheckpointState, *, keep: int = 3) -> Path:
    """Write `state` as `directory/round-NNNNNN` atomically; keep the newest `keep` snapshots.

    Tensors may live on any device (copied to CPU). Saving the same round twice replaces the
    earlier snapshot of that round. Raises OSError when the disk refuses; nothing partial is left
    visible to `load_latest` in that case (the `.tmp-*` directory is removed when possible).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(state.round)
    tmp = directory / f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        files = {}
        for group, tensors in state.groups().items():
            files[f"{group}.safetensors"] = _write_tensors(tmp / f"{group}.safetensors", tensors)
        _write_json(tmp / META_NAME, _meta(state, files))
        _fsync_dir(tmp)
        replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(directory)
    log.info("checkpoint saved: %s (round %d)", final, state.round)
    _prune(directory, keep)
    return final


def _cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> Tensors:
    """Detached, contiguous CPU tensors; tensors that share storage are cloned (safetensors refuses them)."""
    out, seen = {}, set()
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen and t.numel() > 0:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    save_file(_cpu_tensors(tensors), str(path))
    fsync_path(path)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _meta(state: CheckpointState, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "round": state.round,
        "slice_index": state.slice_index,
        "run_id": state.run_id,
        "manifest": state.manifest,
        "peer_id": state.peer_id,
        "version": state.version,
        "tokens_seen": state.tokens_seen,
        "wall_time": state.wall_time,
        "files": files,
    }


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    with path.open("w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def _prune(directory: Path, keep: int) -> None:
    """Delete snapshots beyond the newest `keep`, and temp directories whose writer has died."""
    leftovers = [p for p in directory.iterdir() if (m := _LEFTOVER_PATTERN.match(p.name)) and _dead(int(m.group(1)))]
    for old in list_checkpoints(directory)[keep:] + leftovers:
        try:
            shutil.rmtree(old)
            log.info("checkpoint pruned: %s", old)
        except OSError as err:  # one undeletable snapshot must not fail the save that just succeeded
            log.warning("could not prune checkpoint %s: %s", old, err)


def _dead(pid: int) -> bool:
    """Whether no process `pid` exists: a crashed writer's temp directory (often model-sized) can go."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def _fsync_dir(path: Path) -> None:
    try:
        fsync_path(path)
    except OSError as err:  # some filesystems (and Windows) cannot fsync a directory; the rename still holds
        log.debug("fsync of directory %s failed: %s", path, err)


# ---------------------------------------------------------------------------------------------- load


def load_latest(
    directory: Path, *, run_id: str, expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    expected_dtype: str | None = None,
) -> CheckpointState | None:
    """The newest valid snapshot of run `run_id` in `directory`, or None.

    Every snapshot that fails a check (sidecar, hashes, safetensors header, run id, shapes, finite
    values) is reported with `log.warning` naming its path and the reason, and skipped; nothing is
    deleted (the volunteer may want it). `expected_shapes` (name -> shape) is checked against phi and
    momentum when given, `expected_dtype` (the manifest's: "float32" or "bfloat16") against phi's tensors
    (momentum is always float32). Tensors come back on the CPU.
    """
    for path in list_checkpoints(directory):
        try:
            state = verify_checkpoint(path, run_id=run_id, expected_shapes=expected_shapes,
                                      expected_dtype=expected_dtype)
        except CheckpointError as err:
            log.warning("skipping checkpoint %s: %s", path, err)
            continue
        log.info("resuming from checkpoint %s (round %d, slice %d)", path, state.round, state.slice_index)
        return state
    return None


def verify_checkpoint(
    path: Path, *, run_id: str, expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    expected_dtype: str | None = None,
) -> CheckpointState:
    """Load one snapshot after checking it end to end; raises CheckpointError naming the first problem."""
    meta = _read_meta(path)
    if meta["run_id"] != run_id:
        raise CheckpointError(f"belongs to run {meta['run_id']}, not this run {run_id}")
    groups = {group: _load_group(path, group, meta["files"]) for group in GROUPS}
    if expected_shapes is not None:
        for group in ("phi", "momentum"):
            _check_shapes(group, groups[group], expected_shapes)
    if expected_dtype is not None:
        _check_dtype("phi", groups["phi"], expected_dtype)
        _check_dtype("momentum", groups["momentum"], "float32")
    for group, tensors in groups.items():
        _check_finite(group, tensors)
    try:
        return CheckpointState(
            round=meta["round"],
            slice_index=meta["slice_index"],
            run_id=meta["run_id"],
            manifest=meta["manifest"],
            peer_id=meta["peer_id"],
            version=meta["version"],
            tokens_seen=meta["tokens_seen"],
            wall_time=meta["wall_time"],
            path=path,
            **groups,
        )
    except ValueError as err:
        raise CheckpointError(f"{META_NAME}: {err}") from err


_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "format": int,
    "round": int,
    "slice_index": int,
    "run_id": str,
    "manifest": dict,
    "peer_id": str,
    "version": str,
    "tokens_seen": int,
    "wall_time": (int, float),
    "files": dict,
}


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_NAME
    try:
        size = meta_path.stat().st_size
        if size > MAX_META_BYTES:
            raise CheckpointError(f"{META_NAME} is {size} bytes (limit {MAX_META_BYTES})")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{META_NAME} is missing") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{META_NAME} does not parse: {err}") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"{META_NAME} is not a JSON object")
    for key, kind in _META_TYPES.items():
        if isinstance(meta.get(key), bool) or not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{META_NAME} field {key!r} is missing or not {kind}")
    if meta["format"] != FORMAT_VERSION:
        raise CheckpointError(f"format {meta['format']} is not the supported {FORMAT_VERSION}")
    if path.name != checkpoint_name(meta["round"]):
        raise CheckpointError(f"{META_NAME} says round {meta['round']}, the directory name disagrees")
    return meta


def _load_group(path: Path, group: str, files: dict[str, Any]) -> Tensors:
    name = f"{group}.safetensors"
    entry = files.get(name)
    if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int)):
        raise CheckpointError(f"{META_NAME} lists no hash for {name}")
    file = path / name
    try:
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{name} is {size} bytes, {META_NAME} says {entry['bytes']} (truncated?)")
        if sha256_file(file) != entry["sha256"]:
            raise CheckpointError(f"{name} does not match its SHA-256 in {META_NAME} (corrupt)")
        # safetensors only: a header plus raw bytes, nothing is ever unpickled
        return load_file(str(file), device="cpu")
    except FileNotFoundError as err:
        raise CheckpointError(f"{name} is missing") from err
    except CheckpointError:  # a ValueError too: its message is already the whole story
        raise
    except (OSError, SafetensorError, ValueError) as err:
        raise CheckpointError(f"{name} is not a valid safetensors file: {err}") from err


def _check_shapes(group: str, tensors: Tensors, expected: Mapping[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{group} names differ from the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name]):
            raise CheckpointError(f"{group} {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name])}")


def _check_dtype(group: str, tensors: Tensors, expected: str) -> None:
    """A bf16 run's phi is bf16 on disk, an fp32 run's fp32; anything else is another run's (or a forged)
    file, refused rather than silently cast."""
    for name, tensor in tensors.items():
        found = str(tensor.dtype).removeprefix("torch.")
        if found != expected:
            raise CheckpointError(f"{group} {name} is {found}, the run's manifest says {expected}")


def _check_finite(group: str, tensors: Tensors) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{group} {name} holds non-finite values")
