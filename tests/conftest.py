"""The fixtures of tests with real processes, registered here so that a test asks for them by name only.

`procs`: a `Procs` (peer/lab/harness.py) on the test's tmp_path, every process stopped at teardown.
`netns`: a network of namespaces (benchmarks/netns.py) for one test, skipped where namespaces cannot be made.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks.netns import Network, unavailable
from peer.lab.harness import Procs

torch.set_num_threads(1)
"""In-process tests use one thread: `make test` runs files side by side (pytest-xdist) on cores that the process
tests' peers also want, and OpenMP threads that wait for a busy core spin. The peers set their own
(`OMP_NUM_THREADS=1` in the tests' environments)."""


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
