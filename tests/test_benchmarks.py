"""Smoke tests: the step-cost and convergence benchmarks run end to end at a tiny size and write valid JSON.

Each runs as `python -m benchmarks.NAME`, the way the README says to, in its own process group so
that a timeout also ends the memory-measuring children of step_cost.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(400)


def run_benchmark(name: str, *args: str, timeout: float = 360) -> str:
    """Run a benchmark module; its stdout. Kills its whole process group if it overruns."""
    proc = subprocess.Popen([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"benchmarks.{name} ran past {timeout} s:\n{err[-3000:]}")
    assert proc.returncode == 0, f"benchmarks.{name} exited {proc.returncode}:\n{err[-3000:]}"
    return out


@pytest.mark.slow(45)
def test_step_cost_measures_a_slice_against_the_full_step(tmp_path: Path) -> None:
    path = tmp_path / "step_cost.json"
    out = run_benchmark("step_cost", "--presets", "tiny", "--slices", "4", "--cuts", "blocks", "--rest-steps", "0,0.3",
                        "--repeats", "1", "--batch-size", "2", "--json", str(path))  # fmt: skip
    data = json.loads(path.read_text())
    assert data["device"] == "cpu" and "blocks" in out
    rows = {(r["cut"], r["k"], r["slice"]): r for r in data["rows"]}
    assert set(rows) == {("full", 1, "-")} | {(cut, 4, s) for cut in ("blocks", "blocks+rest") for s in (0, 3)}
    for key, row in rows.items():
        assert row["peak_rss"] >= row["base_rss"] > 0, key
        if key[0] == "full":
            continue
        for field in ("time_ratio", "rss_ratio", "training_rss_ratio"):
            assert math.isfinite(row[field]) and row[field] > 0, (key, field)
        # gradient + AdamW bytes are counted from the optimiser's buffers: exactly 12 bytes per owned coordinate
        # (the rest's sign steps keep nothing once a step is done)
        assert row["state_bytes"] == 12 * row["params"], key
        assert row["state_ratio"] == pytest.approx(row["predicted_state_ratio"])
        assert row["flops_ratio"] == pytest.approx(row["predicted_flops_ratio"], rel=0.15), key
        assert 0 < row["flops_ratio"] < 1 if key[0] == "blocks" else row["flops_ratio"] > 0.9, key
    # the top block group skips the backward below it: far fewer FLOPs than the bottom group, which owns the embedding
    assert rows[("blocks", 4, 3)]["flops_ratio"] < rows[("blocks", 4, 0)]["flops_ratio"]


@pytest.mark.slow(25)
def test_convergence_compares_methods_and_codecs_at_equal_tokens(tmp_path: Path) -> None:
    path = tmp_path / "convergence.json"
    out = run_benchmark("convergence", "--peers", "4,8", "--rounds", "1", "-H", "1", "--batch-size", "2",
                        "--codecs", "fp32,topk", "--jobs", "1", "--json", str(path))  # fmt: skip
    data = json.loads(path.read_text())
    runs = {(r["peers"], r["codec"], r["method"]): r for r in data["runs"]}
    methods = {(p, "int8", m) for p in (4, 8) for m in ("ddp", "diloco", "ppu", "gossip-ppu")}
    assert set(runs) == methods | {(4, "fp32", "gossip-ppu"), (4, "topk", "gossip-ppu")}
    assert {r["tokens"] for r in runs.values()} == {data["tokens_per_run"]} == {4 * 1 * 2 * 128}
    for key, r in runs.items():
        assert math.isfinite(r["val_loss"]) and r["bytes_per_peer"] > 0, key
    assert runs[(8, "int8", "gossip-ppu")]["config"]["batch_size"] == 1  # 8 peers split the 4-peer global batch
    assert runs[(4, "int8", "diloco")]["consensus_distance"] == 0  # one shared phi
    assert runs[(4, "int8", "gossip-ppu")]["consensus_distance"] > 0
    sent = {c: runs[(4, c, "gossip-ppu")]["bytes_per_peer"] for c in ("fp32", "int8", "topk")}
    assert sent["topk"] < sent["int8"] < sent["fp32"]
    assert "by pseudo-gradient codec" in out


def test_convergence_refuses_a_peer_count_that_cannot_split_the_batch(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "benchmarks.convergence", "--peers", "8,3", "--json", str(tmp_path / "x.json")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "cannot split" in done.stderr
    assert not (tmp_path / "x.json").exists()
