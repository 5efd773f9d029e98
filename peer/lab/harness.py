"""Real processes for integration tests: start a command, wait for a line, stop it, keep its logs.

Every process starts in its own session (process group), so whatever it spawns (hivemind's DHT
process, p2pd) can be found (`group_pids`) and killed with it. `Procs.stop_all()` runs in the fixture's
teardown: SIGTERM to every process, then SIGKILL to the groups that did not exit, so nothing is left
running even when a test fails. Logs (stdout and stderr of each process) are kept in files and appended
to assertion messages.

    from procs import murmur, procs_fixture  # noqa: F401 - registers the `procs` fixture

    def test_x(procs):
        node = procs.start("boot", murmur("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", ...))
        maddr = node.wait_for(r"^/ip4/\\S+/p2p/\\S+$").group(0)
        assert node.terminate() == 0
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MURMUR = str(Path(sys.executable).with_name("murmur"))


def murmur(*args: str) -> list[str]:
    """The argv of the installed `murmur` entry point with `args`."""
    return [MURMUR, *args]


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
    """One started process; stdout is read line by line by a thread, stderr goes to a file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.argv = argv
        self.lines: list[str] = []
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        self._cond = threading.Condition()
        self._stderr = open(self.stderr_path, "w")  # closed in _reap
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1, env=env, cwd=cwd,
            start_new_session=True,
        )  # fmt: skip
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

    def wait_for(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match:
        """The first stdout line (from index `start`) matching `pattern`; fails with the logs on timeout/exit."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    match = regex.search(line)
                    if match:
                        return match
                start = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"{self.name}: no line matching {pattern!r}\n{self.logs()}")
                self._cond.wait(min(left, 0.2))

    def wait_exit(self, timeout: float = 30.0) -> int:
        """The exit code once the process ends by itself (fails with the logs on timeout)."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout}s\n{self.logs()}") from None

    def terminate(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL the whole group; the exit code (None if killed)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        self._reap()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash: nothing gets to clean up)."""
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)
        self._reap()

    def kill_alone(self, gone_s: float = 20.0) -> None:
        """SIGKILL this process's own PID only, as the kernel's OOM killer does (not its group), and wait until
        its group empties by itself: the DHT process and p2pd must follow it (protocol/dht.py) within `gone_s`."""
        helpers = group_pids(self.pgid)
        assert len(helpers) >= 3, f"{self.name}: expected the process, its DHT process and p2pd, found {helpers}"
        os.kill(self.popen.pid, signal.SIGKILL)
        assert self.popen.wait(10) == -signal.SIGKILL
        deadline = time.monotonic() + gone_s
        while group_pids(self.pgid):
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: {group_pids(self.pgid)} still running {gone_s:.0f} s after the "
                                     f"process was killed\n{self.logs()}")  # fmt: skip
            time.sleep(0.2)
        self._reap()

    def _reap(self) -> None:
        self._reader.join(5)
        self._stderr.close()

    def logs(self, tail: int = 60) -> str:
        out = "\n".join(self.lines[-tail:])
        try:
            err = "\n".join(self.stderr_path.read_text().splitlines()[-tail:])
        except OSError:
            err = ""
        return f"--- {self.name} argv: {' '.join(self.argv)}\n--- stdout:\n{out}\n--- stderr:\n{err}"


class Procs:
    """The processes of one test; `stop_all()` always leaves nothing running."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_dir = workdir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.all: list[Proc] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = Proc(name, argv, self.log_dir, full_env, self.workdir)
        self.all.append(proc)
        return proc

    def run(self, name: str, argv: list[str], timeout: float = 60.0, env: dict[str, str] | None = None) -> Proc:
        """Start `argv` and wait for it to exit by itself."""
        proc = self.start(name, argv, env)
        proc.wait_exit(timeout)
        proc._reap()
        return proc

    def stop_all(self) -> None:
        for proc in self.all:
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.all:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if proc.popen.poll() is None or group_pids(proc.pgid):
                try:
                    os.killpg(proc.pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.popen.wait(10)
            proc._reap()


@pytest.fixture(name="procs")
def procs_fixture(tmp_path: Path) -> Iterator[Procs]:
    """Real processes for one test, all stopped (SIGTERM, then SIGKILL) at teardown."""
    manager = Procs(tmp_path)
    try:
        yield manager
    finally:
        manager.stop_all()
