"""The fixtures of tests with real processes, registered here so that a test asks for them by name only.

`procs`: a `Procs` (peer/lab/harness.py) on the test's tmp_path, every process stopped at teardown.
`netns`: a network of namespaces (benchmarks/netns.py) for one test, skipped where namespaces cannot be made.
`murmur_home`: each test's own data directory (MURMUR_HOME), used by every test.

The run starts with the files that take longest (`longest_files_first`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks.netns import Network, unavailable
from peer.lab.harness import Procs

torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"
"""One thread per process, in the tests and in every process they start: `make test` runs files side by side
(pytest-xdist) on cores that the process tests' peers also want, and OpenMP threads that wait for a busy core spin.
Most tests set OMP_NUM_THREADS=1 for their peers; the ones that did not (test_benchmarks' step_cost and its memory
children, bootstrap nodes, several tests' owners) ran with two threads each: step_cost took 16 s alone and 45-109 s
beside another test (fresh21, fresh23). A test that wants more threads sets them in its process's environment."""

os.environ["MURMUR_HOME"] = tempfile.mkdtemp(prefix="murmur-tests-home-")
atexit.register(shutil.rmtree, os.environ["MURMUR_HOME"], ignore_errors=True)
"""Never the user's own data directory (identities, pinned run keys, default checkpoints); each test has its own
(`murmur_home`), this one serves what runs outside a test (module fixtures)."""

UNMEASURED_SLOW_S = 30.0
"""The cost of a `slow` mark without its seconds."""


def longest_files_first(items: list[pytest.Item]) -> None:
    """Orders `items` by the seconds of their file's `slow(seconds)` marks, most first; stable, so a file's tests and
    files of equal cost keep the collection's order.

    `make test` hands whole files to its workers (pytest-xdist `--dist loadfile`) in this order
    (`--no-loadscope-reorder`; xdist's own reorder puts files with many tests first, which here are the quick ones).
    Longest first, a worker that picks up a 50 s swarm test does so at the start, beside the others, and the
    run's tail is made of short files, instead of one worker finishing a long file alone on an idle machine.

    A mark on a test counts for that test; a mark on the module (`pytestmark`) or a class counts once for the file:
    test_manifest_fields.py's slow(20) on each of its 87 quick tests made it "1740 s" and put it first.
    """
    cost: Counter[Path] = Counter()
    shared: dict[Path, float] = {}
    for item in items:
        if (own := next((m for m in item.own_markers if m.name == "slow"), None)) is not None:
            cost[item.path] += _seconds(own)
        elif (mark := item.get_closest_marker("slow")) is not None:
            shared[item.path] = max(shared.get(item.path, 0.0), _seconds(mark))
    cost.update(shared)
    items.sort(key=lambda item: -cost[item.path])


def _seconds(mark: pytest.Mark) -> float:
    return float(mark.args[0]) if mark.args else UNMEASURED_SLOW_S


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    longest_files_first(items)


@pytest.fixture(autouse=True)
def murmur_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's data directory, for it and every process it starts that is not given another: a run key
    pinned by one test's peers must not meet the next test's swarm of the same name with another owner."""
    home = tmp_path_factory.mktemp("murmur-home")
    monkeypatch.setenv("MURMUR_HOME", str(home))
    return home


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Real processes for one test, all stopped (SIGTERM, then SIGKILL to their groups) at teardown."""
    manager = Procs(tmp_path)
    try:
        yield manager
    finally:
        manager.stop_all()


@pytest.fixture
def netns(procs: Procs) -> Iterator[Network]:
    """A network for one test; skipped with the reason when namespaces cannot be made here.

    Teardown stops the test's processes first (SIGTERM, then SIGKILL to their groups, as `procs` does), then
    kills anything left inside the namespaces and removes namespaces, veths and bridge, even when the test failed.
    """
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    network = Network()
    try:
        yield network
    finally:
        try:
            procs.stop_all()
        finally:
            network.close()
