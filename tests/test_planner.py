"""The memory planner (peer/core/planner.py), `murmur slices --gpu-memory`, and benchmarks/gpu_check.sh's CPU dry
run. The activation model is checked against the bytes autograd really saves on CPU; on a GPU, the planner's
peak against CUDA's (skipped without one)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from peer.cli.main import main
from peer.core.model import PRESETS, Transformer
from peer.core.planner import (
    GIB,
    HOME_GPUS_GB,
    activation_bytes,
    footprint,
    largest_presets,
    parse_memory,
    plan,
    step_peak,
    usable_bytes,
)
from peer.core.slices import SliceConfig
from protocol.errors import MurmurError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(10)
def test_sizes_parse_in_binary_units_and_bad_ones_name_what_is_expected() -> None:
    assert parse_memory("24GB") == parse_memory("24GiB") == parse_memory("24G") == parse_memory("24 gb") == 24 * GIB
    assert parse_memory("8000MB") == 8000 * 2**20 and parse_memory("1.5G") == 3 * GIB // 2
    assert parse_memory("512KiB") == 512 * 1024 and parse_memory("1T") == 2**40
    for bad in ("24", "", "GB", "24XB", "-1GB", "0GB", "24 G B", "1e3GB", "twelve GB"):
        with pytest.raises(MurmurError, match="expected a size"):
            parse_memory(bad)


def _saved_bytes(name: str, batch: int, checkpointing: bool) -> int:
    """Bytes of the distinct storages autograd saves for one forward of `name` on CPU (fp32), weights excluded."""
    config = PRESETS[name]
    torch.manual_seed(0)
    model = Transformer(config)
    model.checkpointing = checkpointing
    x = torch.randint(0, config.vocab_size, (batch, config.seq_len))
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not (t.is_leaf and t.requires_grad):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(x)
        F.cross_entropy(logits.float().view(-1, logits.size(-1)), x.reshape(-1))
    return sum(seen.values())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["micro", "tiny"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_activation_model_is_what_autograd_saves_on_cpu(name: str, checkpointing: bool) -> None:
    measured = _saved_bytes(name, 2, checkpointing) - _saved_bytes(name, 1, checkpointing)
    predicted = activation_bytes(PRESETS[name], checkpointing=checkpointing, cuda=False)
    assert predicted.saved == measured  # to the byte: the calibration the CUDA model is derived from
    assert predicted.working > 0 and predicted.fixed == 0  # no bf16 weight copies without autocast


@pytest.mark.timeout(10)
def test_cuda_keeps_less_per_sequence_and_a_bf16_copy_of_the_matrices() -> None:
    model = PRESETS["124m"]
    cpu, cuda = activation_bytes(model, cuda=False), activation_bytes(model)
    assert cuda.saved < 0.7 * cpu.saved
    assert 2 * 80_000_000 < cuda.fixed < 2 * 130_000_000  # 2 bytes a matrix coordinate under autocast
    assert activation_bytes(model, dtype="bfloat16").fixed == 0  # bf16 weights need no copy
    assert activation_bytes(model, lowest_block=None).saved < activation_bytes(model, lowest_block=6).saved < cuda.saved


@pytest.mark.timeout(10)
def test_a_peer_fits_or_does_not_and_says_how() -> None:
    small = plan(PRESETS["tiny"], SliceConfig(num_slices=4), 8 * GIB)
    assert small.fits and (small.micro_batch, small.grad_accum) == (8, 1)
    assert not small.checkpointing and not small.offload_outer and small.peak <= small.budget
    assert small.describe() == "micro-batch 8 x 1"
    big = plan(PRESETS["1.3b"], None, 8 * GIB)
    assert not big.fits and big.describe() == "does not fit" and big.peak > big.budget
    assert usable_bytes(8 * GIB) < 8 * GIB and usable_bytes(100 * 2**20) == 0
    fixed, per_sequence, host = footprint(PRESETS["350m"], SliceConfig(num_slices=4), offload_outer=True)
    assert host > 0 and fixed < footprint(PRESETS["350m"], SliceConfig(num_slices=4))[0]
    # the plan that needs help takes the cheaper option first: offload before checkpointing
    tight = plan(PRESETS["350m"], SliceConfig(num_slices=4), 8 * GIB)
    assert tight.fits and tight.offload_outer and not tight.checkpointing
    assert plan(PRESETS["350m"], None, 8 * GIB, micro_batch=8).fits is False


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name,slices", [("124m", None), ("350m", SliceConfig(num_slices=4)),
                                         ("1.3b", SliceConfig(num_slices=8))])  # fmt: skip
def test_more_memory_never_plans_worse(name: str, slices: SliceConfig | None) -> None:
    plans = [plan(PRESETS[name], slices, gb * GIB) for gb in (2, 4, 6, 8, 12, 16, 24, 32, 48, 80)]
    cost = [(p.fits, -p.checkpointing, p.micro_batch if not p.checkpointing else 0) for p in plans]
    assert [p.fits for p in plans] == sorted(p.fits for p in plans)  # once it fits, it keeps fitting
    assert cost == sorted(cost)  # checkpointing goes first, then the micro-batch grows
    assert all(p.peak <= p.budget for p in plans if p.fits)


@pytest.mark.timeout(60)
def test_the_largest_preset_table_covers_every_home_card_and_slices_go_further() -> None:
    rows = largest_presets()
    assert [(r.gpu_gb, r.method) for r in rows] == [
        (gb, m) for gb in HOME_GPUS_GB for m in ("diloco", "murmur K=4 (units)", "murmur K=8 (units)")
    ]
    order = sorted(PRESETS, key=lambda n: footprint(PRESETS[n], None)[0])
    rank = {name: i for i, name in enumerate(order)}
    for gb in HOME_GPUS_GB:
        diloco, *murmur = [r for r in rows if r.gpu_gb == gb]
        assert all(rank[m.preset] >= rank[diloco.preset] for m in murmur)  # a slice never fits less
        assert all(r.plan is not None and r.plan.fits for r in (diloco, *murmur))
    by_size = [rank[r.preset] for r in rows if r.method == "diloco"]
    assert by_size == sorted(by_size)  # a bigger card, a preset at least as big


@pytest.mark.timeout(60)
def test_slices_cli_plans_a_card_and_refuses_a_bad_size_in_one_line() -> None:
    runner = CliRunner()
    done = runner.invoke(main, ["slices", "--preset", "350m", "--slices", "4", "--gpu-memory", "12GB"])
    assert done.exit_code == 0, done.output
    assert "350m on a 12.0 GiB card" in done.output and "diloco" in done.output
    assert "largest preset that fits" in done.output and "24 GB" in done.output
    bad = runner.invoke(main, ["slices", "--gpu-memory", "12XB"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    errors = [line for line in bad.output.splitlines() if line.startswith("Error")]
    assert errors == ["Error: Invalid value for '--gpu-memory': expected a size such as 24GB, 24GiB, 24G or 8000MB, "
                      "got '12XB'"]  # fmt: skip
    odd = runner.invoke(main, ["slices", "--gpu-memory", "8GB", "--micro-batch", "3"])
    assert odd.exit_code == 2 and "must divide the run's batch of 8" in odd.output
    alone = runner.invoke(main, ["slices", "--micro-batch", "2"])
    assert alone.exit_code == 2 and "give --gpu-memory SIZE too" in alone.output


@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,cut", [("124m", "full"), ("124m", "units"), ("350m", "units")])
def test_cuda_peak_of_a_step_is_within_15_percent_of_the_plan(name: str, cut: str) -> None:
    """The issue's bar, on the presets it names (a tiny model's peak is mostly cuBLAS workspace and rounding)."""
    from benchmarks.step_cost import Case, Stepper

    device, batch, k = torch.device("cuda"), 8, 1 if cut == "full" else 4
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()  # what earlier tests of this process still hold
    torch.cuda.reset_peak_memory_stats()
    stepper = Stepper(Case(name, cut, k, 0), batch, device)
    for _ in range(2):
        stepper.step()
    measured = torch.cuda.max_memory_allocated() - before
    stepper.close()
    del stepper
    slices = None if cut == "full" else SliceConfig(num_slices=k, cut=cut)
    predicted = step_peak(PRESETS[name], slices, batch)
    assert abs(predicted / measured - 1) <= 0.15, (predicted, measured)


@pytest.mark.slow(50)
@pytest.mark.timeout(400)
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run_on_cpu_takes_every_path_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "MURMUR_GPU_CHECK_DEVICE": "cpu", "MURMUR_GPU_CHECK_OUT": str(out), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=380, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["dry_run"] and result["failed"] == []
    assert {r["cut"] for r in result["step_cost"]["rows"]} == {"full", "units", "blocks"}
    peers = result["swarm"]["peers"]
    assert len(peers) == 2 and all(p["exit_code"] == 0 and p["loss_falls"] and p["peak_bytes"] > 0 for p in peers)
    assert all(p["tokens_per_s"] > 0 for p in peers)
    assert len(result["planner"]) == 4 and all(r["predicted"] > 0 for r in result["planner"])
    assert "| planner |" in done.stdout and "skipped" in done.stdout  # the CUDA tests ran, and skipped
