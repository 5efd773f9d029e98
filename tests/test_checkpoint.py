"""peer/checkpoint: bit-exact round trips, atomic writes, every kind of damage reported and skipped, resume."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch

import peer.node.checkpoint as ckpt
from peer.core.inner import InnerConfig, SliceOptimizer, inner_round
from peer.core.model import ModelConfig, Transformer
from peer.core.outer import CoordinateMean, nesterov_step
from peer.core.slices import Contribution, SliceConfig, parameter_shapes, partition, pseudo_gradient
from peer.node.checkpoint import CheckpointState, list_checkpoints, load_latest, save_checkpoint
from protocol.codec import CodecConfig, ErrorFeedback, decode

RUN = "ab12cd34"
SHAPES = {"w": (3, 4), "b": (4,)}


def make_state(round_: int, *, run_id: str = RUN, seed: int = 0) -> CheckpointState:
    g = torch.Generator().manual_seed(seed + round_)
    phi = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g).to(torch.bfloat16)}
    return CheckpointState(
        round=round_,
        slice_index=1,
        run_id=run_id,
        phi=phi,
        momentum={name: torch.randn(t.shape, generator=g).to(t.dtype) for name, t in phi.items()},
        inner={"steps": torch.tensor(7 * round_, dtype=torch.int64), "w.exp_avg": torch.randn(2, 4, generator=g)},
        feedback={"w": torch.randn(3, 4, generator=g)},
        manifest={"model": {"d_model": 32}, "name": "unit"},
        peer_id="peer-1",
        version="0.1.0",
        tokens_seen=1000 * round_,
        wall_time=12.5 * round_,
    )


def assert_same(a: CheckpointState, b: CheckpointState) -> None:
    for group, tensors in a.groups().items():
        other = b.groups()[group]
        assert set(tensors) == set(other), group
        for name, t in tensors.items():
            assert t.dtype == other[name].dtype and torch.equal(t, other[name]), (group, name)
    for key in ("round", "slice_index", "run_id", "manifest", "peer_id", "version", "tokens_seen", "wall_time"):
        assert getattr(a, key) == getattr(b, key), key


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture):
    """The murmur logger does not propagate to root, so hand caplog's handler to the module logger."""
    logger = logging.getLogger("murmur.peer.node.checkpoint")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.WARNING)
    yield caplog
    logger.removeHandler(caplog.handler)


def warned(caplog: pytest.LogCaptureFixture, path: Path, reason: str) -> bool:
    return any(str(path) in r.getMessage() and reason in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(60)
def test_round_trip_is_bit_exact_for_float32_bfloat16_int64(tmp_path: Path) -> None:
    state = make_state(5)
    path = save_checkpoint(tmp_path, state)
    assert path == tmp_path / "round-000005"
    assert sorted(p.name for p in path.iterdir()) == [
        "feedback.safetensors",
        "inner.safetensors",
        "meta.json",
        "momentum.safetensors",
        "phi.safetensors",
    ]
    loaded = load_latest(tmp_path, run_id=RUN, expected_shapes=SHAPES)
    assert loaded is not None and loaded.path == path
    assert_same(state, loaded)


@pytest.mark.timeout(60)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_are_saved_from_the_cpu(tmp_path: Path) -> None:
    state = make_state(1)
    state.phi = {name: t.cuda() for name, t in state.phi.items()}
    save_checkpoint(tmp_path, state)
    loaded = load_latest(tmp_path, run_id=RUN)
    assert loaded is not None and torch.equal(loaded.phi["w"], state.phi["w"].cpu())


@pytest.mark.timeout(60)
def test_a_crash_mid_write_leaves_no_visible_partial_checkpoint(tmp_path: Path, monkeypatch) -> None:
    save_checkpoint(tmp_path, make_state(1))
    real, written = ckpt._write_tensors, []

    def crash_after_two(path: Path, tensors: dict) -> dict:
        if len(written) == 2:
            raise OSError("disk yanked")
        written.append(path)
        return real(path, tensors)

    monkeypatch.setattr(ckpt, "_write_tensors", crash_after_two)
    with pytest.raises(OSError, match="disk yanked"):
        save_checkpoint(tmp_path, make_state(2))
    assert len(written) == 2  # half the tensor files really were written before the crash
    assert [p.name for p in tmp_path.iterdir()] == ["round-000001"]
    loaded = load_latest(tmp_path, run_id=RUN)
    assert loaded is not None and loaded.round == 1


@pytest.mark.timeout(60)
def test_a_leftover_temp_directory_is_never_loaded(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, make_state(1))
    save_checkpoint(tmp_path, make_state(2))
    (tmp_path / "round-000002").rename(tmp_path / ".tmp-round-000002-1-dead")
    loaded = load_latest(tmp_path, run_id=RUN)
    assert loaded is not None and loaded.round == 1


def _truncate(path: Path) -> None:
    phi = path / "phi.safetensors"
    phi.write_bytes(phi.read_bytes()[:-7])


def _flip_byte(path: Path) -> None:
    phi = path / "phi.safetensors"
    data = bytearray(phi.read_bytes())
    data[-3] ^= 0x40
    phi.write_bytes(bytes(data))


def _corrupt_meta(path: Path) -> None:
    (path / "meta.json").write_text('{"round": 2, "run_id": ', encoding="utf-8")


def _remove_meta(path: Path) -> None:
    (path / "meta.json").unlink()


def _remove_file(path: Path) -> None:
    (path / "inner.safetensors").unlink()


DAMAGE = {
    "truncated": (_truncate, "truncated"),
    "flipped byte": (_flip_byte, "SHA-256"),
    "corrupt meta": (_corrupt_meta, "does not parse"),
    "missing meta": (_remove_meta, "meta.json is missing"),
    "missing tensor file": (_remove_file, "inner.safetensors is missing"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_checkpoint_is_reported_and_skipped(tmp_path: Path, warnings, damage: str) -> None:
    damage_fn, reason = DAMAGE[damage]
    save_checkpoint(tmp_path, make_state(1))
    newest = save_checkpoint(tmp_path, make_state(2))
    damage_fn(newest)
    loaded = load_latest(tmp_path, run_id=RUN)
    assert loaded is not None and loaded.round == 1
    assert warned(warnings, newest, reason), [r.getMessage() for r in warnings.records]
    assert newest.exists()  # reported, never deleted


@pytest.mark.timeout(60)
def test_nan_tensor_is_reported_and_skipped(tmp_path: Path, warnings) -> None:
    save_checkpoint(tmp_path, make_state(1))
    bad = make_state(2)
    bad.momentum["w"][1, 2] = float("nan")
    newest = save_checkpoint(tmp_path, bad)
    loaded = load_latest(tmp_path, run_id=RUN)
    assert loaded is not None and loaded.round == 1
    assert warned(warnings, newest, "momentum w holds non-finite values")


@pytest.mark.timeout(60)
def test_checkpoint_of_another_run_is_skipped_with_a_clear_line(tmp_path: Path, warnings) -> None:
    save_checkpoint(tmp_path, make_state(1))
    other = save_checkpoint(tmp_path, make_state(2, run_id="ffff0000"))
    loaded = load_latest(tmp_path, run_id=RUN)
    assert loaded is not None and loaded.round == 1
    assert warned(warnings, other, f"belongs to run ffff0000, not this run {RUN}")


@pytest.mark.timeout(60)
def test_wrong_shape_is_reported_and_skipped(tmp_path: Path, warnings) -> None:
    save_checkpoint(tmp_path, make_state(1))
    newest = save_checkpoint(tmp_path, make_state(2))
    loaded = load_latest(tmp_path, run_id=RUN, expected_shapes={"w": (3, 4), "b": (4,)})
    assert loaded is not None and loaded.round == 2
    assert load_latest(tmp_path, run_id=RUN, expected_shapes={"w": (4, 3), "b": (4,)}) is None
    assert warned(warnings, newest, "phi w has shape (3, 4), expected (4, 3)")
    assert load_latest(tmp_path, run_id=RUN, expected_shapes={"w": (3, 4)}) is None
    assert warned(warnings, newest, "unexpected ['b']")


@pytest.mark.timeout(60)
def test_none_when_nothing_valid(tmp_path: Path) -> None:
    assert load_latest(tmp_path / "absent", run_id=RUN) is None
    assert load_latest(tmp_path, run_id=RUN) is None


@pytest.mark.timeout(60)
def test_keep_prunes_oldest_only_after_the_new_one_is_complete(tmp_path: Path, monkeypatch) -> None:
    for r in range(1, 5):
        save_checkpoint(tmp_path, make_state(r), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round-000004", "round-000003"]
    monkeypatch.setattr(ckpt, "_write_json", lambda path, obj: (_ for _ in ()).throw(OSError("full")))
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, make_state(5), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round-000004", "round-000003"]
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path, make_state(6), keep=0)


@pytest.mark.timeout(60)
def test_a_dead_writers_temp_directory_is_swept_a_live_ones_kept(tmp_path: Path) -> None:
    dead = tmp_path / ".tmp-round-000002-999999999-deadbeef"
    live = tmp_path / f".tmp-round-000002-{os.getpid()}-0badf00d"
    for d in (dead, live):
        d.mkdir()
        (d / "phi.safetensors").write_bytes(b"half")
    save_checkpoint(tmp_path, make_state(3))
    assert not dead.exists() and live.exists()


@pytest.mark.timeout(60)
def test_state_refuses_bad_metadata() -> None:
    for bad in ({"round": -1}, {"run_id": "not hex"}, {"tokens_seen": -5}, {"wall_time": float("nan")}):
        with pytest.raises(ValueError):
            CheckpointState(**{**vars_of(make_state(1)), **bad})


def vars_of(state: CheckpointState) -> dict:
    return {name: getattr(state, name) for name in CheckpointState.__slots__}


@pytest.mark.timeout(60)
def test_saving_the_same_round_again_replaces_it(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, make_state(3, seed=0))
    again = make_state(3, seed=99)
    save_checkpoint(tmp_path, again)
    loaded = load_latest(tmp_path, run_id=RUN)
    assert loaded is not None
    assert_same(again, loaded)
    assert [p.name for p in tmp_path.iterdir()] == ["round-000003"]


class _Evil:
    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.timeout(60)
def test_a_pickle_named_like_a_checkpoint_is_never_unpickled(tmp_path: Path, warnings) -> None:
    save_checkpoint(tmp_path, make_state(1))
    newest = save_checkpoint(tmp_path, make_state(2))
    marker = tmp_path.parent / f"{tmp_path.name}-pwned"
    evil = _Evil()
    evil.marker = marker
    payload = pickle.dumps({"w": evil})
    (newest / "phi.safetensors").write_bytes(payload)
    # forge the sidecar's hash too, so only the format check stands between the payload and a loader
    meta = json.loads((newest / "meta.json").read_text())
    meta["files"]["phi.safetensors"] = {"sha256": ckpt.sha256_file(newest / "phi.safetensors"), "bytes": len(payload)}
    (newest / "meta.json").write_text(json.dumps(meta))
    loaded = load_latest(tmp_path, run_id=RUN)
    assert loaded is not None and loaded.round == 1
    assert not marker.exists()
    assert warned(warnings, newest, "phi.safetensors is not a valid safetensors file")


# ------------------------------------------------------------------------------------ resume equivalence

MODEL = ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=16)
INNER = InnerConfig(steps_per_round=3, warmup_steps=2, total_steps=50, batch_size=2)
CODEC = CodecConfig(name="int8", block_size=32)
SLICE = 1


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    tokens = [torch.randint(0, MODEL.vocab_size, (INNER.batch_size, MODEL.seq_len + 1), generator=g) for _ in range(5)]
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


class Peer:
    """One peer's round in the daemon's order: inner steps from phi, compressed delta, Nesterov step."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = Transformer(MODEL)
        self.layout = partition(MODEL, SliceConfig(num_slices=2))[SLICE]
        self.optimizer = SliceOptimizer(self.model, self.layout, INNER)
        self.feedback = ErrorFeedback(CODEC)
        self.phi = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.momentum = {n: torch.zeros_like(t) for n, t in self.phi.items()}
        self.round = 0
        data = _batches()
        self.batches = lambda step, micro: data[step % len(data)]

    def run_round(self) -> None:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(self.phi[name])
        inner_round(self.model, self.optimizer, self.batches, torch.device("cpu"))
        theta = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        delta = pseudo_gradient(self.phi, theta, self.layout)
        sent = {n: decode(self.feedback.encode(n, t), CODEC) for n, t in delta.tensors.items()}
        mean = CoordinateMean(self.phi)
        mean.add(Contribution(self.layout, sent))
        nesterov_step(self.phi, self.momentum, mean.mean(), lr=0.7, mu=0.9)
        self.round += 1

    def state(self) -> CheckpointState:
        return CheckpointState(
            round=self.round,
            slice_index=SLICE,
            run_id=RUN,
            phi=self.phi,
            momentum=self.momentum,
            inner=self.optimizer.state_dict(),
            feedback=self.feedback.state_dict(),
        )

    def restore(self, state: CheckpointState) -> None:
        self.phi, self.momentum, self.round = state.phi, state.momentum, state.round
        self.optimizer.load_state_dict(state.inner)
        self.feedback.load_state_dict(state.feedback)


@pytest.mark.timeout(60)
def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = Peer(seed=0)
    for _ in range(4):
        straight.run_round()

    first = Peer(seed=0)
    for _ in range(2):
        first.run_round()
    save_checkpoint(tmp_path, first.state())
    del first

    resumed = Peer(seed=7)  # fresh objects, different init: everything must come from the checkpoint
    state = load_latest(tmp_path, run_id=RUN, expected_shapes=parameter_shapes(MODEL))
    assert state is not None and state.round == 2
    resumed.restore(state)
    for _ in range(2):
        resumed.run_round()

    assert resumed.round == straight.round == 4
    assert resumed.optimizer.steps == straight.optimizer.steps
    for name, p in straight.phi.items():
        assert torch.equal(p, resumed.phi[name]), name
    init = Peer(seed=0).phi
    assert any(not torch.equal(p, init[n]) for n, p in straight.phi.items())  # the rounds really moved phi
