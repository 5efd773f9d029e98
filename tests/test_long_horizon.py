"""benchmarks/long_horizon: what a cached key means, one real (tiny) run, and the report from its cache."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.long_horizon import MAIN, NEW, load_cache, pinned, report, save_cache
from benchmarks.long_horizon_runs import Variant, build_config, run_variant

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(300)


def test_a_key_names_the_method_its_outer_settings_and_only_what_differs() -> None:
    assert pinned("ppu").key() == "ppu lr=0.4 momentum=0.5"  # main's settings, pinned: the key outlives a default
    assert pinned("ppu", NEW, peers=16).key() == "ppu peers=16 rest_step=0.3 lr=0.7 momentum=0.5"
    assert pinned("gossip-ppu", MAIN).key() == "gossip-ppu lr=0.5 momentum=0.5 consensus=0.5"
    config = build_config(pinned("ppu", NEW, slices=8))
    assert config.inner.rest_step == 0.3 and config.slices.num_slices == 8 and config.outer["ppu"].lr == 0.7
    assert build_config(pinned("ppu")).inner.rest_step == 0.0  # main's PPU froze the rest
    with pytest.raises(ValueError, match="cannot split"):
        build_config(Variant(method="ppu", peers=5))


def test_a_tiny_run_is_cached_and_reported(tmp_path: Path) -> None:
    v = Variant(method="ppu", peers=2, rounds=2, H=2, global_batch=2, rest_step=0.3)
    row = run_variant(v)
    assert row["key"] == v.key() and math.isfinite(row["val_loss"]) and len(row["probe"]) == 2
    assert row["peak_state_bytes_per_peer"] > 0 and row["tokens"] > 0
    path = tmp_path / "cache.json"
    save_cache({v.key(): row}, path)
    assert load_cache(path)[v.key()]["val_loss"] == row["val_loss"]
    text = report(load_cache(path))
    assert "## after" in text and "(not run)" in text  # nothing of the real sections is in this cache


def test_an_unknown_section_is_one_clear_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.long_horizon", "--run", "nope", "--results",
                           str(tmp_path / "c.json"), "--plot", ""], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "unknown section" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "c.json").exists()
