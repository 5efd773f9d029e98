"""Real processes for the demo, the tests and the benchmarks: start a command, wait for a line, stop it, keep its logs.

One harness for all three, so that what the demo does to its children (and what leaves nothing running) is
what the tests exercise. Every process starts in its own session (process group), so whatever it spawns
(hivemind's DHT process, p2pd) can be found (`group_pids`) and killed with it. `Procs.stop_all()` runs in a
`finally` (the demo's, the `procs` fixture's teardown, a benchmark's): SIGTERM to every process, then SIGKILL
to every group, so nothing is left running even when a step failed. Logs (stdout and stderr of each process)
are kept in files under `<workdir>/logs`, and their last lines go into every error raised here.

The tests and benchmarks start `murmur` commands and Python scripts through a fork server (peer/lab/forkserver.py):
each is still its own process, session and group, but begins after torch, hivemind and murmur were imported once,
about 1.5 CPU-seconds to a joined peer instead of 5.8. The demo execs its commands (`Procs(fork=False)`).

    def test_x(procs):  # the fixture (tests/conftest.py) is a Procs on the test's tmp_path
        node = procs.start("boot", murmur("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", ...))
        maddr = node.wait_for(MADDR_LINE).group(1)
        assert node.terminate() == 0

Errors are AssertionError by default (a test's failure); the demo passes its own class, which the CLI reports.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from peer.lab import forkserver
from protocol.logs import get_logger

log = get_logger(__name__)

MURMUR = forkserver.MURMUR
STOP_ALL_GRACE_S = 15.0
"""How long `Procs.stop_all` waits, in all, for processes to exit on SIGTERM before it kills their groups."""


MADDR_LINE = r"^(/ip4/127\.0\.0\.1/tcp/\d+/p2p/(\w+))$"
"""The line `murmur bootstrap` prints for a loopback listener: group 1 is the multiaddr, group 2 its peer id."""


def maddr_line(host: str) -> str:
    """MADDR_LINE for a listener on `host` (a test's own network namespace, say)."""
    return MADDR_LINE.replace(r"127\.0\.0\.1", re.escape(host))


def wait_until(condition: Callable[[], bool], timeout: float, what: str, procs: Sequence[Proc] = (), *,
               fail_on_exit: bool = False) -> float:  # fmt: skip
    """Poll `condition` until true and return the seconds it took; fail with the processes' logs after `timeout`
    seconds, or at once when one of `procs` exited and `fail_on_exit` (nothing it should do can come then)."""
    began = time.monotonic()
    while not condition():
        exited = [p.name for p in procs if p.popen.poll() is not None] if fail_on_exit else []
        if exited or time.monotonic() - began > timeout:
            cause = f"{', '.join(exited)} exited" if exited else f"not within {timeout:.0f}s"
            raise AssertionError(f"{cause}: {what}\n" + "\n".join(p.logs() for p in procs))
        time.sleep(0.2)
    return time.monotonic() - began


def murmur(*args: str) -> list[str]:
    """The argv of the installed `murmur` entry point with `args`."""
    return [MURMUR, *args]


MEMBER_SCRIPT = str(Path(__file__).resolve().parent.parent / "cli" / "member.py")
"""peer/cli/member.py: a swarm member that trains nothing (named by path: the lab does not import the CLI)."""


def member(*args: str) -> list[str]:
    """The argv of a membership-only swarm member with `murmur run`'s membership flags `args`."""
    return [sys.executable, MEMBER_SCRIPT, *args]


def run_toml(swarm: str, *, preset: str = "tiny", slices: int = 2, steps_per_round: int = 5, batch_size: int = 4,
             warmup_steps: int = 5, total_steps: int = 2000, fanout: int = 2, exchange_timeout_s: float = 10,
             min_round_s: float | None = None, clip: float | None = None) -> str:  # fmt: skip
    """The run config (`create-run --config`) of a swarm on this machine: the demo's, the tests' and the
    benchmarks', which differ only in these values. The defaults are the tests' usual swarm: K=2, H=5, batch 4."""
    outer = "" if clip is None else f"[outer]\nclip = {clip!r}\n"
    pacing = "" if min_round_s is None else f"min_round_s = {min_round_s!r}\n"
    return (f'swarm = "{swarm}"\npreset = "{preset}"\n[slices]\nnum_slices = {slices}\n'
            f"[inner]\nsteps_per_round = {steps_per_round}\nbatch_size = {batch_size}\nwarmup_steps = {warmup_steps}\n"
            f"total_steps = {total_steps}\n{outer}[gossip]\nfanout = {fanout}\n"
            f"exchange_timeout_s = {exchange_timeout_s!r}\n{pacing}")


def group_pids(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (zombies excluded)."""
    found = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
    pids = []
    for pid in map(int, found):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            pids.append(pid)
    return pids


class Proc:
    """One started process; stdout is read line by line by a thread (into `lines` and a file), stderr goes to
    a file. Its failures raise `error`, with the last `tail` lines of each log."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str], cwd: Path,
                 error: type[Exception] = AssertionError, tail: int = 60, fork: bool = True) -> None:  # fmt: skip
        self.name = name
        self.argv = argv
        self.lines: list[str] = []
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        self._error, self._tail = error, tail
        self._cond = threading.Condition()
        plan = forkserver.forkable(argv) if fork else None
        server = forkserver.shared_server() if plan is not None else None
        self.popen: subprocess.Popen[str] | forkserver.ForkedPopen
        if server is not None and plan is not None:
            netns, command = plan
            self.popen = server.spawn(command, env, cwd, self.stderr_path, netns=netns)
        else:
            with open(self.stderr_path, "w") as err:  # the child writes to its own copy of the descriptor
                self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1,
                                              env=env, cwd=cwd, start_new_session=True)  # fmt: skip
        self.pgid = self.popen.pid
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        with open(self.stdout_path, "w") as out:
            for line in self.popen.stdout:
                out.write(line)
                out.flush()
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 30.0, start: int = 0) -> re.Match[str]:
        """The first stdout line (from index `start`) matching `pattern`; fails with the logs on timeout, or as
        soon as stdout is closed (no line can come any more)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    if match := regex.search(line):
                        return match
                start = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    raise self._error(f"{self.name}: no line matching {regex.pattern!r}\n{self.logs()}")
                self._cond.wait(min(left, 0.2))

    def wait_exit(self, timeout: float = 30.0) -> int:
        """The exit code once the process ends by itself (fails with the logs on timeout)."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self._error(f"{self.name} still running after {timeout}s\n{self.logs()}") from None

    def terminate(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL the whole group; the exit code (None if killed).

        A process that exits on SIGTERM leaves its group alone: whether its helpers follow it is for the caller
        to check (`group_pids`); `stop` kills them too."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        self._reap()
        return self.popen.returncode

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL to whatever is left of the group after `grace` seconds (its DHT helpers
        included); the exit code, None when a signal ended it."""
        code = self.terminate(grace)
        self._kill_group()
        return code if code is not None and code >= 0 else None

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash: nothing gets to clean up)."""
        self._kill_group()
        self._reap()

    def kill_alone(self, gone_s: float = 20.0) -> None:
        """SIGKILL this process's own PID only, as the kernel's OOM killer does (not its group), and wait until
        its group empties by itself: the DHT process and p2pd must follow it (protocol/dht.py) within `gone_s`."""
        helpers = group_pids(self.pgid)
        if len(helpers) < 3:
            raise self._error(f"{self.name}: expected the process, its DHT process and p2pd, found {helpers}")
        os.kill(self.popen.pid, signal.SIGKILL)
        if (code := self.popen.wait(10)) != -signal.SIGKILL:
            raise self._error(f"{self.name}: exit code {code} after SIGKILL\n{self.logs()}")
        deadline = time.monotonic() + gone_s
        while group_pids(self.pgid):
            if time.monotonic() > deadline:
                raise self._error(f"{self.name}: {group_pids(self.pgid)} still running {gone_s:.0f} s after the "
                                  f"process was killed\n{self.logs()}")  # fmt: skip
            time.sleep(0.2)
        self._reap()

    def _kill_group(self) -> None:
        """SIGKILL whatever is left of the process group, and reap the process."""
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:  # stuck in the kernel; the other processes still get stopped
            log.warning("%s (pid %d) did not die after SIGKILL", self.name, self.popen.pid)

    def _reap(self) -> None:
        self._reader.join(5)

    def logs(self, tail: int | None = None) -> str:
        """The command and the last `tail` lines (by default, those its errors quote) of its stdout and stderr."""
        tail = self._tail if tail is None else tail
        out = "\n".join(self.lines[-tail:])
        try:
            err = "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-tail:])
        except OSError:
            err = ""
        return f"--- {self.name} argv: {' '.join(self.argv)}\n--- stdout:\n{out}\n--- stderr:\n{err}"


def unwind_on_sigterm() -> None:
    """Make SIGTERM end this (main) process through its `finally` blocks, as Ctrl-C does: Python's default SIGTERM
    exits at once, so the `finally` that calls `Procs.stop_all()` never ran and every child (each in its own process
    group) was left running. For a benchmark's `main`: `timeout` (gpu_check.sh) and `kill` send SIGTERM."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


class Procs:
    """The processes of one test, demo or benchmark run, started in `workdir`; `stop_all()` always leaves
    nothing running. `error` and `tail` are what their failures raise and how many log lines they quote (a test
    wants much of the logs in its failure; the demo shows a user a short tail, as its own DemoError). `fork`: start
    `murmur` commands and Python scripts through the fork server (peer/lab/forkserver.py), others always exec'd."""

    def __init__(self, workdir: Path, error: type[Exception] = AssertionError, tail: int = 60,
                 fork: bool = True) -> None:  # fmt: skip
        self.workdir = workdir
        self.fork = fork
        self.log_dir = workdir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._error, self._tail = error, tail
        self.all: list[Proc] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        """`argv` started in the work dir, with this environment plus `env` (and unbuffered Python output, so
        its lines arrive as they are printed)."""
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = Proc(name, argv, self.log_dir, full_env, self.workdir, self._error, self._tail, self.fork)
        self.all.append(proc)
        return proc

    def run(self, name: str, argv: list[str], timeout: float = 60.0, env: dict[str, str] | None = None) -> Proc:
        """Start `argv` and wait for it to exit by itself."""
        proc = self.start(name, argv, env)
        proc.wait_exit(timeout)
        proc._reap()
        return proc

    def stop_all(self) -> None:
        """SIGTERM every process still running, then, after at most STOP_ALL_GRACE_S in all, SIGKILL every
        group (the helpers of processes that exited included)."""
        for proc in self.all:
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_ALL_GRACE_S
        for proc in self.all:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            proc._kill_group()
            proc._reap()
