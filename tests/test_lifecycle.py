"""Processes die together (DESIGN 5b): a bootstrap node killed with SIGKILL on its own PID (what the OOM killer
does; not the whole group) takes its hivemind DHT process and p2pd with it and restarts with its identity. A
`murmur run` peer killed the same way, restarted at once, rejoining and resuming from its checkpoint, is
tests/test_daemon_faults.py's crash test (one swarm for both).

The DHT process itself honours SIGTERM, and its p2pd dies with it even when it is SIGKILLed (p2pd is
spawned with PR_SET_PDEATHSIG, which uvloop's subprocess_exec sets up through preexec_fn).
Waits poll with generous deadlines; nothing rests on a fixed sleep.
"""

from __future__ import annotations

import asyncio
import asyncio.subprocess
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import hivemind.dht.dht as hivemind_dht
import pytest
import uvloop

import peer.node.lifecycle as lifecycle
import protocol.dht
from peer.lab.harness import MADDR_LINE, Procs, murmur, wait_until
from protocol.dht import _spawn_with_death_signal, start_dht, start_wait_s
from protocol.errors import DHTStartError, DHTStopped

PRINT_DEATH_SIGNAL = "import ctypes as c; s = c.c_int(); c.CDLL(None).prctl(2, c.byref(s), 0, 0, 0); print(s.value)"
"""Prints the death signal of the process running it (prctl 2 = PR_GET_PDEATHSIG)."""
GONE_S = 20.0
"""A killed process's DHT child and p2pd must be gone within this (they take about a second)."""


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its parent counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def children(pid: int) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_the_dht_process_honours_sigterm_and_takes_p2pd_along_even_when_killed(sig: signal.Signals) -> None:
    dht = start_dht(host_maddrs=("/ip4/127.0.0.1/tcp/0",), startup_timeout_s=30)
    try:
        p2pd = children(dht.pid)
        assert len(p2pd) == 1 and alive(p2pd[0]), p2pd
        os.kill(dht.pid, sig)
        wait_until(lambda: not alive(dht.pid) and not alive(p2pd[0]), 10, f"the DHT process and p2pd exit on {sig!r}")
        with pytest.raises(DHTStopped):  # a call to a DHT process that is gone fails instead of hanging
            dht.get("murmur/v1/lifecycle/peers")
    finally:
        dht.shutdown()


@pytest.mark.timeout(60)
def test_a_dht_process_that_hangs_while_starting_is_stopped_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """hivemind waits for its DHT process without a bound; a child stuck before p2pd starts (one spun on a
    finaliser inherited through fork, protocol/dht.py) kept `murmur run` waiting forever. Now it is stopped."""

    async def hang(*args: object, **kwargs: object) -> None:
        await asyncio.sleep(3600)

    assert start_wait_s(1) == 12  # p2pd's start-up timeout twice, and 10 s more
    monkeypatch.setattr(hivemind_dht.DHTNode, "create", hang)  # the fork inherits it: the child hangs
    monkeypatch.setattr(protocol.dht, "start_wait_s", lambda startup_timeout_s: 2.0)  # waited for 2 s, not 12
    with pytest.raises(DHTStartError, match=r"not up after 2s.*\n.*hung while starting") as failed:
        start_dht(host_maddrs=("/ip4/127.0.0.1/tcp/0",), startup_timeout_s=1)
    print(f"\n{failed.value}")


@pytest.mark.timeout(60)
def test_a_dht_whose_connection_bound_fails_to_start_is_stopped_and_the_error_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fresh18: 'the DHT failed to start: ' with nothing after it (a bare TimeoutError) and the started process
    left running. The error now names the exception, and the half-started DHT is shut down."""
    started: list[hivemind_dht.DHT] = []

    def refuse(dht: hivemind_dht.DHT, initial_peers: object) -> None:
        started.append(dht)
        raise TimeoutError()

    monkeypatch.setattr(protocol.dht, "bound_connections", refuse)
    with pytest.raises(DHTStartError, match=r"failed to start: TimeoutError\n  -> ") as failed:
        start_dht(host_maddrs=("/ip4/127.0.0.1/tcp/0",), startup_timeout_s=30)
    print(f"\n{failed.value}")
    assert len(started) == 1
    started[0].join(timeout=20)
    assert not started[0].is_alive()


async def _length(blob: bytes, _dht: object, _node: object) -> int:
    return len(blob)


@pytest.mark.timeout(60)
def test_the_dht_process_takes_a_call_bigger_than_one_pipe_write() -> None:
    """multiprocessing sends a message over 16 KB in two writes; hivemind alone could wake on the first, and died
    a few calls later (protocol/dht.WholeMessages). Every call must be answered, and the process must live on."""
    dht = start_dht(host_maddrs=("/ip4/127.0.0.1/tcp/0",), startup_timeout_s=30)
    try:
        for size in (20_000, 200_000):  # without the fix the first size killed it within a few calls (measured)
            for _ in range(5):
                calls = [dht.run_coroutine(partial(_length, bytes(size)), return_future=True) for _ in range(3)]
                assert [call.result(timeout=20) for call in calls] == [size] * 3
        assert dht.is_alive()
    finally:
        dht.shutdown()


@pytest.mark.timeout(30)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_p2pd_is_spawned_with_a_death_signal_by_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the DHT process does before starting p2pd, here in the test process (monkeypatch restores it)."""
    monkeypatch.setattr(asyncio.subprocess, "create_subprocess_exec", asyncio.subprocess.create_subprocess_exec)
    _spawn_with_death_signal()

    async def death_signal_of_a_child() -> bytes:
        child = await asyncio.subprocess.create_subprocess_exec(
            sys.executable, "-c", PRINT_DEATH_SIGNAL, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await child.communicate()
        return out

    assert uvloop.run(death_signal_of_a_child()).strip() == str(int(signal.SIGKILL)).encode()


@pytest.mark.timeout(90)
def test_a_bootstrap_node_killed_alone_leaves_nothing_and_restarts_with_its_identity(procs: Procs) -> None:
    args = ("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--identity", "boot.key")
    boot = procs.start("boot", murmur(*args))
    boot_id = boot.wait_for(MADDR_LINE, timeout=40).group(2)
    boot.kill_alone(GONE_S)
    again = procs.start("boot-again", murmur(*args))
    assert again.wait_for(MADDR_LINE, timeout=40).group(2) == boot_id, "a bootstrap node keeps its libp2p identity"


RUN_TOML = """
swarm = "lifecycle"
preset = "tiny"
[slices]
num_slices = 2
[inner]
steps_per_round = 3
batch_size = 4
"""


@pytest.mark.timeout(180)
def test_a_peer_whose_dht_process_is_killed_stops_with_a_clear_error(procs: Procs) -> None:
    """The other way round: the OOM killer picks the DHT process, not the daemon. The daemon must not train on
    blind (its peer list frozen); it stops, says why in one line, exits non-zero, and p2pd goes too."""
    (procs.workdir / "run.toml").write_text(RUN_TOML)
    made = procs.run("create", murmur("create-run", "--config", "run.toml", "--key", "owner.key", "--out", "m.json"))
    assert made.popen.returncode == 0, made.logs()
    boot = procs.start("boot", murmur("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--identity", "boot.key"))
    maddr = boot.wait_for(MADDR_LINE, timeout=60).group(1)
    peer = procs.start("owner", murmur("run", "--swarm", "lifecycle", "--initial-peers", maddr, "--identity", "o.id",
                                       "--manifest", "m.json", "--key", "owner.key", "--announce-ttl", "3",
                                       "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--client-only", "--device", "cpu",
                                       "--eval-every", "0"))  # fmt: skip
    peer.wait_for(r"^round \d+ ", timeout=120)
    dht_pid = next(pid for pid in children(peer.popen.pid) if children(pid))  # the one that started p2pd
    p2pd = children(dht_pid)
    os.kill(dht_pid, signal.SIGKILL)
    assert peer.wait_exit(60) == 1, peer.logs()
    wait_until(lambda: not any(alive(pid) for pid in p2pd), GONE_S, "p2pd exits with its DHT process", [peer])
    errors = [line for line in peer.stderr_path.read_text().splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "DHT process" in errors[0], peer.logs()
    assert "Traceback" not in peer.stderr_path.read_text(), peer.logs()


class _LateFuture:
    """An MPFuture whose answer lands just as the parent's wait for it times out: `result(timeout=...)` raises the
    wait's TimeoutError, and by then the future is done."""

    def __init__(self, outcome: object) -> None:
        self.outcome, self.waits = outcome, 0

    def result(self, timeout: float | None = None) -> object:
        if timeout is not None and self.waits == 0:
            self.waits += 1
            raise TimeoutError
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def done(self) -> bool:
        return self.waits > 0


@pytest.mark.timeout(10)
def test_an_answer_that_lands_as_the_wait_times_out_is_returned_not_an_empty_timeout() -> None:
    # fresh18: a peer's start failed with "the DHT failed to start: " and nothing after it: the trimmer's start-up call
    # was answered as the parent's 0.5 s wait ended, and the wait's own empty TimeoutError was raised
    alive = type("Alive", (), {"is_alive": lambda self: True})()
    assert protocol.dht.TetheredDHT._result(alive, _LateFuture(7)) == 7  # type: ignore[arg-type]
    with pytest.raises(TimeoutError, match="inside the DHT"):  # the call's own error still comes through
        protocol.dht.TetheredDHT._result(alive, _LateFuture(TimeoutError("timed out inside the DHT")))  # type: ignore[arg-type]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("halted", [True, False])
def test_an_error_of_the_stopping_dht_during_start_is_a_clean_stop_only_after_a_signal(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, halted: bool
) -> None:
    """Ctrl-C signals the process group, p2pd too: fresh22's owner was told to stop while it asked a bootstrap node
    for its address, the vanished p2pd socket raised FileNotFoundError, and the user saw a traceback. After a signal
    that is a clean stop; without one it is still an error."""
    halt = threading.Event()
    if halted:
        halt.set()

    @asynccontextmanager
    async def joined(*args: object, **kwargs: object) -> AsyncIterator[SimpleNamespace]:
        yield SimpleNamespace(signalled=halt)

    async def daemon_for(*args: object) -> SimpleNamespace:
        return SimpleNamespace(clock=6)  # it trained rounds 0-6 before the signal

    async def start(*args: object) -> None:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(lifecycle, "joined", joined)
    monkeypatch.setattr(lifecycle, "_daemon_for", daemon_for)
    monkeypatch.setattr(lifecycle, "_start", start)
    opts = lifecycle.DaemonOptions(join=SimpleNamespace(swarm="s"), device="cpu")  # type: ignore[arg-type]
    caplog.set_level("INFO", logger="murmur")
    if halted:
        asyncio.run(lifecycle.run_daemon(opts, software_version="test"))
        assert "stopped (FileNotFoundError from the stopping DHT)" in caplog.text
        assert "left swarm s after 7 round(s)" in caplog.text  # the rounds it trained, not "none"
    else:
        with pytest.raises(FileNotFoundError):
            asyncio.run(lifecycle.run_daemon(opts, software_version="test"))
