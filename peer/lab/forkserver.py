"""A fork server for the harness: one process imports torch, hivemind and murmur once, then forks every `murmur`
command (and Python script) the harness starts, so that a child begins where a fresh one would be after its imports.

Why: a fresh `murmur run` spends ~3 of its ~6 CPU-seconds of start-up importing torch and hivemind. The tests
start about a hundred such processes on a 2-core machine, up to 19 at once; those imports were a quarter of
the suite's CPU time, and in a crowded test each process waited a minute for its share of the cores.
Python's `multiprocessing` forkserver does the same for its workers; this one starts whole commands.

A child is still a real process of its own: its own PID and session (process group), its own stdout pipe and
stderr file, its own working directory, environment and argv, default signal dispositions; it runs the same
click entry point and ends like a Python process does (non-daemon threads joined, atexit handlers run, streams
flushed). What it shares with its siblings is what a fork shares: the imported modules (copy-on-write) and
Python's string hash seed. `random` is reseeded by Python at the fork; torch's generator starts from its
import-time seed, as in a fresh process. `OMP_NUM_THREADS` is read by the OpenMP runtime when torch loads,
so the child applies its own value with `torch.set_num_threads`.

The server is a child of the harness's process, in its own session, and exits when the harness's end of the
control socket closes. Each child's exit code comes back over that socket (the server is its parent and reaps
it); `ForkedPopen` offers the part of `subprocess.Popen` the harness uses. `MURMUR_FORK_SERVER=0` turns it
off: every process is then exec'd as before.

    python -m peer.lab.forkserver FD      (started by `ForkServer`, never by hand)
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import IO

from protocol.logs import get_logger

log = get_logger(__name__)

PRELOAD = ("torch", "hivemind", "grpc.aio", "uvloop", "peer.cli.main", "peer.node.daemon", "peer.swarm.join",
           "protocol.dht", "protocol.service", "protocol.client", "bootstrap.node")  # fmt: skip
"""What the server imports before its first fork: everything slow that `murmur run` and `murmur bootstrap` import."""
MESSAGE_BYTES = 1 << 20
REAP_EVERY_S = 0.05
ENABLE_ENV = "MURMUR_FORK_SERVER"
CLONE_NEWNET = 0x40000000
MURMUR = str(Path(sys.executable).with_name("murmur"))
"""The `murmur` console script beside this interpreter: what the harness starts for a `murmur` command."""


def forkable(argv: list[str]) -> tuple[str | None, list[str]] | None:
    """(network namespace or None, the command) when the server can start `argv`: a `murmur` command or `python
    SCRIPT ...`, either alone or behind `ip netns exec NAME`; None for anything else (it is exec'd)."""
    netns = None
    if argv[:3] == ["ip", "netns", "exec"] and len(argv) > 4:
        netns, argv = argv[3], argv[4:]
    if argv[0] == MURMUR or (argv[0] == sys.executable and len(argv) > 1 and argv[1].endswith(".py")):
        return netns, argv
    return None


# ------------------------------------------------------------------------------------------------ the server side


def serve(control: socket.socket) -> None:
    """Fork a child for each request on `control`; report each child's exit; return when `control` closes."""
    try:
        _serve(control)
    except (ConnectionError, BrokenPipeError):
        pass  # the harness is gone; its children are its to stop (they are in sessions of their own)


def _serve(control: socket.socket) -> None:
    children: dict[int, int] = {}
    """pid -> the id of the request that started it: exits are reported by request id, never by a reusable pid."""
    while True:
        ready, _, _ = select.select([control], [], [], REAP_EVERY_S)
        if ready:
            message, fds, _, _ = socket.recv_fds(control, MESSAGE_BYTES, 2)
            if not message:
                return
            request = json.loads(message)
            pid = os.fork()
            if pid == 0:
                control.close()
                _run_child(request, stdout_fd=fds[0], stderr_fd=fds[1])  # never returns
            for fd in fds:
                os.close(fd)
            children[pid] = request["id"]
            control.send(json.dumps({"id": request["id"], "pid": pid}).encode())
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            code = os.waitstatus_to_exitcode(status)
            control.send(json.dumps({"exited": children.pop(pid), "code": code}).encode())


def _run_child(request: dict, *, stdout_fd: int, stderr_fd: int) -> None:
    """In the forked child: become the requested process, run its command, exit as Python would."""
    code = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        for fd, target in ((null, 0), (stdout_fd, 1), (stderr_fd, 2)):
            os.dup2(fd, target)
            os.close(fd)
        if request.get("netns"):
            enter_netns(request["netns"])
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if threads := os.environ.get("OMP_NUM_THREADS"):
            import torch

            torch.set_num_threads(int(threads))
        code = _exit_code(request["argv"])
    except BaseException:  # whatever happened, the child must not return into the server's loop
        traceback.print_exc()
    finally:
        try:
            threading._shutdown()  # type: ignore[attr-defined]  # what interpreter exit does: join non-daemon threads
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            if code == -signal.SIGINT:  # as Python ends on an uncaught KeyboardInterrupt: by the signal
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGINT)
            os._exit(code)


def enter_netns(name: str) -> None:
    """Move this (single-threaded) process into network namespace `name`, as `ip netns exec NAME` does for the
    network (threads and processes it starts later are in it too); its mounts stay the server's."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into network namespace {name}")
    finally:
        os.close(fd)


def _exit_code(argv: list[str]) -> int:
    """Run `argv`, `murmur ARGS` (the console script pip wrote, which calls the click entry point) or `python
    SCRIPT ARGS`, as `__main__`; its exit code as the interpreter would make it (SystemExit's code; 1 for an
    exception, printed)."""
    sys.argv = list(argv if Path(argv[0]).name == "murmur" else argv[1:])  # what the script's own argv would be
    try:
        sys.path[0] = str(Path(sys.argv[0]).resolve().parent)
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return -signal.SIGINT
    except BaseException:  # printed, as an uncaught exception would be
        traceback.print_exc()
        return 1
    return 0


def main() -> None:
    control = socket.socket(fileno=int(sys.argv[1]))
    for name in PRELOAD:
        __import__(name)
    control.send(b'{"ready": true}')
    serve(control)


# ------------------------------------------------------------------------------------------------ the harness side


class ForkedPopen:
    """What the harness uses of `subprocess.Popen`, for a child of the fork server: pid, args, stdout (text, line
    by line), poll, wait, send_signal and returncode (negative: the signal that ended it); the harness signals
    through send_signal only."""

    def __init__(self, server: ForkServer, request_id: int, pid: int, argv: list[str], stdout: IO[str]) -> None:
        self._server = server
        self._request_id = request_id
        self.pid = pid
        self.args = argv
        self.stdout = stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.exit_code(self._request_id, timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._server.exit_code(self._request_id, timeout=timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


class ForkServer:
    """The harness's end: start the server once, ask it for children, learn their exit codes."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        self.process = subprocess.Popen([sys.executable, "-m", "peer.lab.forkserver", str(theirs.fileno())],
                                        pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True)  # fmt: skip
        theirs.close()
        self._control = ours
        self._cond = threading.Condition()
        self._started: dict[int, int] = {}  # request id -> pid
        self._exited: dict[int, int] = {}  # request id -> exit code
        self._next_id = 0
        self._send = threading.Lock()
        self._closing = False
        if json.loads(ours.recv(MESSAGE_BYTES) or b"{}").get("ready") is not True:
            raise RuntimeError(f"the fork server did not start (exit code {self.process.wait()})")
        self.alive = True
        threading.Thread(target=self._listen, name="forkserver", daemon=True).start()

    def spawn(self, argv: list[str], env: dict[str, str], cwd: Path, stderr_path: Path,
              netns: str | None = None) -> ForkedPopen:  # fmt: skip
        """Fork `argv` (a `murmur` command or `python SCRIPT ...`) in `cwd` with exactly `env`, inside network
        namespace `netns` if given; `argv` is what `ForkedPopen.args` says."""
        read_fd, write_fd = os.pipe()
        err_fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with self._send:
                self._next_id += 1
                request_id = self._next_id
                request = {"id": request_id, "argv": argv, "env": env, "cwd": str(cwd), "netns": netns}
                socket.send_fds(self._control, [json.dumps(request).encode()], [write_fd, err_fd])
        finally:
            os.close(write_fd)
            os.close(err_fd)
        with self._cond:
            if not self._cond.wait_for(lambda: request_id in self._started or not self.alive, timeout=30):
                raise RuntimeError(f"the fork server did not start {argv[:2]} within 30 s")
            if request_id not in self._started:
                raise RuntimeError("the fork server exited")
            pid = self._started.pop(request_id)
        return ForkedPopen(self, request_id, pid, argv, os.fdopen(read_fd, "r", buffering=1))

    def exit_code(self, request_id: int, timeout: float | None) -> int | None:
        """The exit code of the child `request_id` started once it ended, else None after `timeout` seconds (0: do
        not wait)."""
        with self._cond:
            self._cond.wait_for(lambda: request_id in self._exited or not self.alive, timeout=timeout)
            return self._exited.get(request_id)

    def _listen(self) -> None:
        try:
            while message := self._control.recv(MESSAGE_BYTES):
                event = json.loads(message)
                with self._cond:
                    if "exited" in event:
                        self._exited[event["exited"]] = event["code"]
                    else:
                        self._started[event["id"]] = event["pid"]
                    self._cond.notify_all()
        except OSError:
            pass
        with self._cond:
            self.alive = False
            self._cond.notify_all()
        if not self._closing:
            log.warning("the fork server stopped (exit code %s); later processes are exec'd", self.process.poll())

    def close(self) -> None:
        self._closing = True
        try:
            self._control.shutdown(socket.SHUT_RDWR)  # wakes the listener (a close alone would not) and the server
        except OSError:
            pass
        self._control.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


_server: ForkServer | None = None
_server_lock = threading.Lock()


def shared_server() -> ForkServer | None:
    """This process's fork server, started on first use; None when turned off (MURMUR_FORK_SERVER=0) or gone."""
    global _server
    if os.environ.get(ENABLE_ENV, "1") == "0":
        return None
    with _server_lock:
        if _server is None:
            try:
                _server = ForkServer()
            except (OSError, RuntimeError, ValueError) as exc:
                os.environ[ENABLE_ENV] = "0"  # not again for every process
                log.warning("no fork server (%s); processes are exec'd", exc)
                return None
            atexit.register(_server.close)
        return _server if _server.alive else None


if __name__ == "__main__":
    main()
