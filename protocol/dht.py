"""Starting and refreshing murmur's hivemind DHT node, in a process that dies with its parent.

hivemind runs a DHT node in a forked child process (`DHT` is an `mp.Process`), and that child starts
`p2pd`. Nothing ties either to the process that started them: when a daemon dies without shutting its DHT
down (SIGKILL, the kernel's OOM killer), both stay behind as orphans. Worse, the orphan ignores SIGTERM:
the daemon installed asyncio signal handlers before the fork, so the child inherited Python's no-op
handler (and a wakeup fd that points into the parent's event loop). A peer restarted with the same libp2p
identity was then refused ("Identity ... is already taken by another peer") until the orphan was killed
by hand. `TetheredDHT` ties the child and p2pd to their parent; `start_dht` always starts one.

Identity: pass `identity_path` only where the libp2p peer id must stay the same across restarts, which is
bootstrap nodes (their `/p2p/...` address is published). A training peer's identity in the swarm is its
Ed25519 murmur identity (announcements are signed by it and stored under its peer id); nobody pins its
libp2p id, so peers start with a fresh one every time.
"""

from __future__ import annotations

import asyncio
import asyncio.subprocess
import ctypes
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import TypeVar

from hivemind.dht import DHT, DHTNode
from hivemind.dht.routing import DHTKey, DHTValue, Subkey
from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils import MPFuture
from hivemind.utils.multiaddr import Multiaddr

from protocol.dht_connections import BUCKET_SIZE, bound_connections
from protocol.errors import DHTStartError, DHTStopped
from protocol.logs import get_logger
from protocol.records import RecordValidator

log = get_logger(__name__)

PARENT_POLL_S = 0.5
"""How often the DHT child checks that its parent is still there."""
STOP_GRACE_S = 5.0
"""How long the DHT child's orderly stop may take before it exits the hard way."""
NODE_STOP_S = 2.0
"""How long the node's own shutdown may take; longer means p2pd is already gone and never answers it."""
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_T = TypeVar("_T")


class TetheredDHT(DHT):
    """A hivemind DHT whose child process, and the p2pd it starts, die with the process that started it.

    In the child (`run`), before hivemind's own `run` starts its event loop:
    - SIGTERM and SIGHUP stop the node in order (DHTNode.shutdown terminates p2pd) and exit the child,
      or exit it with os._exit after STOP_GRACE_S if that hangs. The inherited signal wakeup fd is
      dropped first, so a signal to the child no longer reaches the parent's event loop.
    - A watchdog thread polls os.getppid() every PARENT_POLL_S and, once the parent is gone, stops the
      child the same way. PR_SET_PDEATHSIG would not do for the child itself: it fires when the *thread*
      that forked exits, and `start_dht` runs in asyncio.to_thread workers, which come and go.
    - p2pd is spawned with PR_SET_PDEATHSIG = SIGKILL (see `_spawn_with_death_signal`), so it dies even
      when the child is SIGKILLed. There the forking thread is right: the child's event loop, which
      spawns p2pd, runs in its main thread for the whole life of the process. (hivemind's p2pd also
      quits by itself once its client's persistent connection closes, but not while it is starting.)

    In the parent, starting and `get`, `store`, `run_coroutine` raise DHTStopped instead of waiting forever
    when the child is gone: hivemind's futures are never resolved by a dead process, and now the child may
    go first (systemd, for one, sends SIGTERM to every process of a service at once).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        # set before hivemind's __init__, which forks at once when start=True
        self._tether_parent = os.getpid()
        self._stopping = False
        # Garbage of this process (a closed event loop's thread pool, say) is collected here, where its threads
        # live: collected in the child instead, its finaliser joined a thread that does not exist there, and the
        # DHT process spun on one core before it ever started (seen in tests/test_lifecycle.py after test_limits)
        gc.collect()
        self._start_wait_s = start_wait_s(float(kwargs.get("startup_timeout", 15.0)))  # type: ignore[arg-type]
        super().__init__(*args, **kwargs)

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """hivemind's start-up wait, bounded by `start_wait_s` (hivemind's own has no bound: a DHT process that
        hangs before p2pd starts kept its parent waiting forever); raises DHTStopped if the DHT process exits
        first, TimeoutError (after stopping it) if it is not up in time."""
        if timeout is not None:
            super().wait_until_ready(timeout)
            return
        try:
            self._result(self._ready, deadline=time.monotonic() + self._start_wait_s)
        except _StartTimeout:
            self.kill()
            self.join(STOP_GRACE_S)
            raise TimeoutError(f"the DHT process was not up after {self._start_wait_s:.0f}s and was stopped") from None

    def get(self, key: DHTKey, latest: bool = False, return_future: bool = False, **kwargs: object) -> object:
        """hivemind's `DHT.get`; raises DHTStopped if the DHT process exits before it answers."""
        future = super().get(key, latest=latest, return_future=True, **kwargs)
        return future if return_future else self._result(future)

    def store(self, key: DHTKey, value: DHTValue, expiration_time: float, subkey: Subkey | None = None,
              return_future: bool = False, **kwargs: object) -> object:  # fmt: skip
        """hivemind's `DHT.store`; raises DHTStopped if the DHT process exits before it answers."""
        future = super().store(key, value, expiration_time, subkey=subkey, return_future=True, **kwargs)
        return future if return_future else self._result(future)

    def run_coroutine(self, coro: Callable[[DHT, DHTNode], Awaitable[_T]], return_future: bool = False) -> object:
        """hivemind's `DHT.run_coroutine`; raises DHTStopped if the DHT process exits before it answers."""
        future = super().run_coroutine(coro, return_future=True)
        return future if return_future else self._result(future)

    def _result(self, future: MPFuture, deadline: float | None = None) -> object:
        """Parent: the future's result, checking every PARENT_POLL_S that the child still lives to give it (and,
        with a `deadline` on the monotonic clock, raising _StartTimeout once it passed)."""
        while True:
            try:
                return future.result(timeout=PARENT_POLL_S)
            except FutureTimeout:
                if future.done():  # it finished as our wait ended: its own result, or its own error (a call that
                    return future.result()  # timed out inside the DHT), never the empty TimeoutError of our wait
            if not self.is_alive():
                break
            if deadline is not None and time.monotonic() > deadline:
                raise _StartTimeout
        try:  # an answer sent just before the child exited may still be on its way
            return future.result(timeout=1.0)
        except FutureTimeout:
            if future.done():
                return future.result()
        raise DHTStopped(f"the DHT process {self.pid} exited (code {self.exitcode}) while a call waited on it")

    def run(self) -> None:
        """Child process only: tie this process and p2pd to the parent, then serve as hivemind does."""
        signal.set_wakeup_fd(-1)  # the inherited fd belongs to the parent's event loop
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_stop_signal)
        _spawn_with_death_signal()
        threading.Thread(target=self._watch_parent, name="dht-watch-parent", daemon=True).start()
        self._inner_pipe = WholeMessages(self._inner_pipe)
        super().run()

    def _watch_parent(self) -> None:
        """Child process: when the parent is gone (re-parented to init or a subreaper), stop as on SIGTERM."""
        while os.getppid() == self._tether_parent:
            time.sleep(PARENT_POLL_S)
        log.info("DHT process %d: parent %d is gone; stopping", os.getpid(), self._tether_parent)
        os.kill(os.getpid(), signal.SIGTERM)  # one stop path: the handler runs in the loop's (main) thread

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        """Child process, main thread: shut the node down on the event loop, then exit; hard exit if stuck."""
        if self._stopping:
            return
        self._stopping = True
        hard_exit = threading.Timer(STOP_GRACE_S, _exit_now, args=(1,))
        hard_exit.daemon = True  # never holds up an exit that got there first
        hard_exit.start()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        node: DHTNode | None = getattr(self, "_node", None)
        if loop is None or node is None:
            _exit_now(0)  # nothing to stop in order yet; a p2pd being started gets its death signal
            return
        loop.call_soon_threadsafe(loop.create_task, self._stop_node(node, signal.Signals(signum).name))

    async def _stop_node(self, node: DHTNode, why: str) -> None:
        """Child: stop the node (p2pd terminated, its sockets removed), then exit."""
        try:
            await asyncio.wait_for(node.shutdown(), NODE_STOP_S)
        except asyncio.TimeoutError:  # p2pd went first (a signal to the whole group) and never answers the node
            await node.p2p.shutdown()
        except Exception as exc:  # exiting anyway; p2pd gets its death signal when this process exits
            log.warning("DHT process %d: shutdown on %s failed: %r", os.getpid(), why, exc)
        finally:
            _exit_now(0)


class WholeMessages:
    """The DHT process's end of hivemind's command pipe, read one whole message at a time.

    hivemind waits on the pipe with a uvloop reader, which makes it non-blocking, while multiprocessing writes a
    message over 16 KB as its header and then its body. A read that woke on the header raised BlockingIOError,
    hivemind logged it and went on mid-message, and the next read killed the DHT process with EOFError
    (hivemind PR #660 and rl-swarm's EOFError reports; measured here: three concurrent 20 KB calls killed it
    within five rounds, tests/test_lifecycle.py). Once `poll` says a message has begun, the rest is on its way,
    so the read blocks for it.
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def recv(self) -> object:
        fd = self._connection.fileno()
        os.set_blocking(fd, True)
        try:
            return self._connection.recv()
        finally:
            os.set_blocking(fd, False)

    def __getattr__(self, name: str) -> object:  # fileno, poll, close: the connection's own
        return getattr(self._connection, name)


def _exit_now(code: int) -> None:
    """Flush and leave at once: no atexit handlers or finalizers, which could wait on a dead parent."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing left to flush to
            pass
    os._exit(code)


def _death_signal_setter() -> Callable[[], None] | None:
    """A function that gives the calling process SIGKILL when its parent thread dies; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def die_with_parent() -> None:  # runs in the forked p2pd, before exec (which keeps the setting)
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: the signal will never come
            os.kill(os.getpid(), signal.SIGKILL)

    return die_with_parent


def _spawn_with_death_signal() -> None:
    """DHT child only: make hivemind's p2pd (and its identity probe) die with this process.

    hivemind's P2P.create starts p2pd with `asyncio.subprocess.create_subprocess_exec(...)` and no
    preexec_fn, and offers no hook; so this process's binding of that one function is replaced by one that
    adds a preexec_fn setting PR_SET_PDEATHSIG. uvloop's subprocess_exec honours preexec_fn (it forks and
    runs it before exec). The patch lives only in the forked child: the parent's module is untouched.
    """
    die_with_parent = _death_signal_setter()
    if die_with_parent is None:
        return
    spawn = asyncio.subprocess.create_subprocess_exec

    async def create_subprocess_exec(*args: object, preexec_fn: Callable[[], None] | None = None,
                                     **kwargs: object) -> asyncio.subprocess.Process:  # fmt: skip
        return await spawn(*args, preexec_fn=preexec_fn or die_with_parent, **kwargs)

    asyncio.subprocess.create_subprocess_exec = create_subprocess_exec


class _StartTimeout(Exception):
    """The DHT process was not up by the start-up deadline."""


def start_wait_s(startup_timeout_s: float) -> float:
    """How long a parent waits for its DHT process to come up: p2pd's own start-up timeout twice (the node then
    dials its initial peers) and 10 s more."""
    return 2 * startup_timeout_s + 10.0


def startup_timeout_within(total_s: float) -> float:
    """The p2pd start-up timeout whose whole start (`start_wait_s`) takes at most `total_s` (5 s at the least)."""
    return max(5.0, (total_s - 10.0) / 2)


def _start_hint(detail: str, timeout_s: float) -> str:
    if "failed to connect to bootstrap peers" in detail:
        return (
            "none of the --initial-peers answered. Check each address (it must end in /p2p/<id>), "
            "that the node is up, and that your firewall allows outgoing TCP to it"
        )
    if "failed to start in" in detail:
        return f"p2pd did not start within {timeout_s:.0f}s; raise --dht-start-timeout on a slow machine"
    if "multiaddr" in detail:
        return "a multiaddr is malformed; they look like /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW..."
    if "was not up after" in detail:
        return "the DHT process hung while starting; run with MURMUR_LOG_LEVEL=DEBUG and report its log"
    if "address already in use" in detail.lower():
        return "the --host-maddrs port is taken by another process; pick another port or use tcp/0"
    return "p2pd's own message, if it printed one, is above; MURMUR_LOG_LEVEL=DEBUG shows more"


def start_dht(
    *,
    initial_peers: Sequence[str] = (),
    host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",),
    announce_maddrs: Sequence[str] = (),
    identity_path: Path | None = None,
    startup_timeout_s: float = 60.0,
    client_mode: bool = False,
) -> TetheredDHT:
    """A started DHT (`TetheredDHT`: dies with this process) that admits murmur records only (`RecordValidator`).

    Its k-buckets hold BUCKET_SIZE nodes and it keeps its connections bounded (protocol/dht_connections.py).
    `identity_path` is a libp2p key file (created when missing) that keeps the DHT peer id stable across
    restarts: bootstrap nodes need that; training peers pass None and get a fresh id each start (nobody pins
    it, and a restart never collides with its own previous id). Raises DHTStartError with the cause and a
    hint instead of hivemind's bare errors.
    """
    try:
        dht = TetheredDHT(
            initial_peers=list(initial_peers),
            host_maddrs=list(host_maddrs),
            announce_maddrs=list(announce_maddrs) or None,
            identity_path=str(identity_path) if identity_path is not None else None,
            startup_timeout=startup_timeout_s,
            record_validators=[RecordValidator()],
            client_mode=client_mode,
            bucket_size=BUCKET_SIZE,
            start=True,
        )
    except DHTStopped as exc:
        raise DHTStartError(f"the DHT failed to start: {exc}\n  -> it was stopped or killed while starting") from exc
    except _START_ERRORS as exc:
        raise _start_error(exc, startup_timeout_s) from exc
    try:
        bound_connections(dht, initial_peers)
    except (DHTStopped, *_START_ERRORS) as exc:
        dht.shutdown()  # started, but not as asked: nothing of it may outlive this error
        raise _start_error(exc, startup_timeout_s) from exc
    return dht


_START_ERRORS = (P2PDaemonError, RuntimeError, OSError, ValueError)
"""What hivemind and p2pd raise when a DHT cannot start: each becomes one DHTStartError with a hint."""


def _start_error(exc: BaseException, startup_timeout_s: float) -> DHTStartError:
    # an exception with no message (a bare TimeoutError) is still named, never an empty detail
    detail = str(exc).strip() or type(exc).__name__
    return DHTStartError(f"the DHT failed to start: {detail}\n  -> {_start_hint(detail, startup_timeout_s)}")


async def _refresh_routing(_dht: DHT, node: DHTNode, initial_peers: Sequence[str]) -> int:
    """Inside the DHT process: re-dial the initial peers, then look up our own neighbourhood."""
    for text in initial_peers:
        try:
            maddr = Multiaddr(text)
            peer = PeerID.from_base58(maddr["p2p"])
            await node.p2p._client.connect(peer, [maddr.decapsulate(Multiaddr(f"/p2p/{maddr['p2p']}"))])
            await node.protocol.call_ping(peer)
        except Exception as exc:  # one dead bootstrap node must not stop the others
            log.debug("re-bootstrap: %s did not answer (%r)", text, exc)
    await node.find_nearest_nodes([node.node_id])
    return len(node.protocol.routing_table.uid_to_peer_id)


def refresh_routing(dht: DHT, initial_peers: Sequence[str]) -> int:
    """Re-bootstrap: dial `initial_peers` again and refresh the routing table; returns its size.

    Peers call it when they see too few peers; bootstrap nodes call it on a timer (DHT splits at start
    and stale routing tables are the usual cause of a swarm that does not find itself).
    """
    return dht.run_coroutine(partial(_refresh_routing, initial_peers=list(initial_peers)))
