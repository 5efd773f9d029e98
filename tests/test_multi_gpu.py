"""A multi-GPU peer (`murmur run --gpus N`, peer/node/ranks.py) on the CPU: gloo, two processes.

The equivalence: a round trained by rank 0 and one worker process, each micro-batch split between them, ends on
the same weights as the single-process Trainer on the same round, slice and data, for both cuts, with the rest
frozen or moved by its sign step. And `murmur run --device cpu --gpus 2` as a real process in a swarm.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from conftest_swarm import JOINED, start_peer, start_swarm

from peer.config import RunConfig
from peer.lab.harness import Proc, Procs, group_pids, wait_until
from peer.node.ranks import RankFailed, Ranks, rank_devices
from peer.node.roundline import parse_all
from peer.node.trainer import Halted, Trainer
from protocol.errors import SetupError

PEER = "ab" * 32
CPU = torch.device("cpu")


def run_config(cut: str, rest: float, dtype: str = "float32") -> RunConfig:
    slices = {"num_slices": 2, "cut": cut}
    return RunConfig.from_dict({"swarm": "gpus", "preset": "micro", "dtype": dtype, "slices": slices,
                                "inner": {"steps_per_round": 3, "batch_size": 4, "warmup_steps": 1, "lr": 1e-2,
                                          "rest_step": rest}})  # fmt: skip


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, flip: float) -> None:
    """Equal within float rounding: all but 1 in 10^4 coordinates within 3e-5 (0.3% of one AdamW step of lr
    1e-2; AdamW divides near-zero gradients by their own size, which magnifies the rounding of summing two ranks'
    halves), and the rest within a sign step's flip `flip` per move (a rest coordinate whose gradient rounds to
    the other side of zero), 6 moves a round."""
    diff = torch.cat([(got[name] - expected[name]).abs().reshape(-1) for name in expected])
    assert int((diff > 3e-5).sum()) <= diff.numel() // 10_000, f"{int((diff > 3e-5).sum())} of {diff.numel()} differ"
    assert float(diff.max()) <= 6 * flip + 3e-5


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker process uses one thread, like the in-process rank 0 (tests/conftest.py)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.slow(5)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("cut, index, rest", [("units", 1, 0.3), ("blocks", 0, 0.3), ("blocks", 1, 0.0)])
def test_two_gloo_processes_train_the_same_round_as_one(one_thread: None, cut: str, index: int, rest: float) -> None:
    """Two rounds (the second continues the optimiser's moments on the worker without resending them): the
    weights, rest coordinates included, agree within float rounding, so does the pseudo-gradient phi - theta (not
    compared after the codec, whose rounding to its levels can magnify the smallest difference); tokens count
    both ranks' rows."""
    run, halt = run_config(cut, rest), threading.Event()
    alone = Trainer(run, PEER, CPU, micro_batch=2, grad_accum=2)
    split = Trainer(run, PEER, CPU, micro_batch=2, grad_accum=2)
    split.ranks = Ranks.start(run, split.inner, CPU, 2, timeout_s=60)
    try:
        for trainer in (alone, split):
            trainer.take_slice(index)
        for round_ in range(2):
            one, two = alone.train_round(round_, halt), split.train_round(round_, halt)
            assert one.tokens == two.tokens == 3 * 4 * run.model.seq_len
            assert two.loss == pytest.approx(one.loss, rel=1e-5)  # the mean over both ranks' rows
            assert_same(weights(split), weights(alone), flip=2 * run.inner.lr * rest / 2)  # theta: delta = phi - theta
    finally:
        split.ranks.close()
    assert all(proc.returncode == 0 for proc in split.ranks.procs)


@pytest.mark.slow(5)
@pytest.mark.timeout(120)
def test_a_bfloat16_model_trains_alike_on_two_processes(one_thread: None) -> None:
    """bf16 weights, fp32 phi (the masters start from it on every rank): not equal to the single process, whose
    bf16 gradients round over the whole micro-batch at once, but the pseudo-gradients differ by ~1% on average."""
    run, halt = run_config("units", 0.3, "bfloat16"), threading.Event()
    alone = Trainer(run, PEER, CPU, micro_batch=2, grad_accum=2)
    split = Trainer(run, PEER, CPU, micro_batch=2, grad_accum=2)
    split.ranks = Ranks.start(run, split.inner, CPU, 2, timeout_s=60)
    try:
        for trainer in (alone, split):
            trainer.take_slice(1)
        one, two = alone.train_round(0, halt), split.train_round(0, halt)
        assert two.loss == pytest.approx(one.loss, abs=0.01)
        expected, got = alone.optimizer.pseudo_gradient(alone.phi), split.optimizer.pseudo_gradient(split.phi)
        diff = torch.cat([(got[n] - expected[n]).abs().reshape(-1) for n in expected]).mean()
        size = torch.cat([expected[n].abs().reshape(-1) for n in expected]).mean()
        assert float(diff) < 0.05 * float(size)
    finally:
        split.ranks.close()


@pytest.mark.slow(5)
@pytest.mark.timeout(120)
def test_halt_resume_and_a_dead_worker(one_thread: None) -> None:
    """SIGTERM during a round (Halted) leaves the worker waiting for the next one; a restored optimiser (resume)
    reaches the worker, so the next round still matches the single process; a worker killed between rounds
    makes the next round raise RankFailed with one line."""
    run, halt = run_config("units", 0.0), threading.Event()
    alone = Trainer(run, PEER, CPU, micro_batch=2, grad_accum=2)
    split = Trainer(run, PEER, CPU, micro_batch=2, grad_accum=2)
    ranks = split.ranks = Ranks.start(run, split.inner, CPU, 2, timeout_s=60)
    try:
        for trainer in (alone, split):
            trainer.take_slice(0)
            trainer.train_round(0, halt)
        alone.train_round(1, halt)  # alone one round ahead: its moments are not the worker's
        halt.set()
        with pytest.raises(Halted):
            split.train_round(1, halt)
        halt.clear()
        state = {name: t.clone() for name, t in alone.optimizer.state_dict().items()}
        for trainer in (alone, split):
            trainer.take_slice(0)
            trainer.optimizer.load_state_dict(state)  # what peer/node/resume.py does
            trainer.train_round(2, halt)
        assert_same(weights(split), weights(alone), flip=0.0)
        ranks.procs[0].kill()
        ranks.procs[0].wait()
        with pytest.raises(RankFailed, match=r"^rank 1 of this peer's 2 processes exited \(code -9\); stopping$"):
            split.train_round(3, halt)
    finally:
        ranks.close()


@pytest.mark.timeout(10)
def test_rank_devices_and_batch_checks() -> None:
    assert rank_devices(CPU, 3) == [CPU] * 3
    with pytest.raises(SetupError, match="CUDA devices"):
        rank_devices(torch.device("cuda", 0), torch.cuda.device_count() + 1)
    run = run_config("units", 0.0)
    trainer = Trainer(run, PEER, CPU, micro_batch=2, grad_accum=2)
    with pytest.raises(SetupError, match="--batch-size a multiple of 3"):
        Ranks.start(run, trainer.inner, CPU, 3)


def workers_of(proc: Proc) -> list[int]:
    """PIDs of `proc`'s rank workers (they share its process group)."""
    pids = []
    for pid in group_pids(proc.pgid):
        try:
            if b"peer.node.rank_worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    return pids


@pytest.mark.slow(18)
@pytest.mark.timeout(300)
def test_murmur_run_on_two_cpu_processes_is_one_peer_that_trains_and_stops(procs: Procs) -> None:
    """Two `--gpus 2` peers on `micro`: each trains with one worker, its loss falls, each sees exactly one
    partner (one announcement per peer, none per worker); SIGTERM ends the owner with exit 0 and its worker with
    it, SIGKILL of the other's own PID leaves nothing of its group (worker included) behind."""
    maddr, run_key = start_swarm(procs, preset="micro")
    owner = start_peer(procs, "owner", maddr, "--gpus", "2")
    other = start_peer(procs, "peer1", maddr, "--gpus", "2", "--run-key", run_key)
    for proc in (owner, other):
        proc.wait_for(JOINED, timeout=120)
        assert len(workers_of(proc)) == 1, proc.logs()

    def trained(proc: Proc) -> bool:
        rounds = parse_all(proc.lines)
        return len(rounds) >= 4 and any(r.exchanged for r in rounds)

    wait_until(lambda: trained(owner) and trained(other), 150, "4 rounds and an exchange each", [owner, other])
    untrained = parse_all(owner.lines)[0].loss  # the owner starts the run from the initial weights
    for proc in (owner, other):  # the other may late-join a few rounds in (a loaded machine): it starts trained then
        rounds = parse_all(proc.lines)
        assert rounds[-1].loss < untrained - 0.2, proc.logs()
        assert max(r.partners for r in rounds) == 1 and any(r.exchanged for r in rounds), proc.logs()
    worker = workers_of(owner)
    assert owner.terminate(timeout=60) == 0, owner.logs()
    assert not set(worker) & set(group_pids(owner.pgid)), "the owner's worker outlived it"
    other.kill_alone()


@pytest.mark.timeout(30)
def test_gpus_beyond_the_visible_cuda_devices_is_a_usage_error_of_one_line(tmp_path: Path) -> None:
    """Checked before anything starts; `--gpus` with `--device cpu` is not an error (gloo processes)."""
    from click.testing import CliRunner

    from peer.cli.main import main

    base = ["run", "--swarm", "x", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmX", "--identity", str(tmp_path / "k")]
    over = str(max(2, torch.cuda.device_count() + 1))
    result = CliRunner().invoke(main, [*base, "--device", "auto", "--gpus", over])
    assert result.exit_code == 2 and "CUDA devices" in result.output, result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, [*base, "--gpus", "0"])
    assert result.exit_code == 2 and "--gpus" in result.output, result.output
