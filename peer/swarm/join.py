"""The one join sequence, shared by `murmur run` (peer/node/lifecycle.py) and the membership-only member of the
tests (peer/cli/member.py).

Order of a join: identity (default: the data directory's) -> DHT (with a clear error if it cannot start) -> the
identity's lock (one running peer per identity), then the DHT's multiaddrs into --addrs-file -> manifest (publish
with the owner key, or fetch and verify against --run-key, pinned from then on, or the pin) -> RunConfig from it
(`joined`) -> PeerService on --listen (unless --client-only; neither: on any port, announcing the IP a bootstrap
node sees, `own_endpoint`) -> slice (least covered) and first announcement -> reachability test by a bootstrap node
(unreachable: say which port to open and continue client-only) (`enter`) -> the caller's work until SIGTERM/SIGINT
-> stop the server, then the DHT; return normally (exit code 0). `swarm_view` is the read-only variant for commands
that only look.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from hivemind.p2p import P2PDaemonError, P2PHandlerError
from hivemind.utils import get_dht_time

from peer.config import RunConfig
from peer.swarm.membership import Member, Swarm, SwarmConfig, slice_counts
from peer.swarm.reachability import check_reachability, observe_host
from protocol.dht import TetheredDHT, start_dht
from protocol.errors import DHTStopped, JoinInterrupted, ManifestError, SetupError
from protocol.files import atomic_write
from protocol.identity import Identity
from protocol.logs import get_logger
from protocol.manifest import PinStore, SignedRunManifest, accept_owner, load_json, murmur_home, parse_run_key
from protocol.records import check_swarm_name
from protocol.service import PeerServer, PeerStatus, ServerConfig
from protocol.updates import ReceivedUpdate, WirePolicy

log = get_logger(__name__)


ANY_INTERFACE = ("0.0.0.0", 0)
"""Where a peer told neither --listen nor --client-only serves: every interface, any free port."""


def default_identity() -> Path:
    """The identity of a volunteer who names none: one per user, in the data directory (protocol.manifest)."""
    return murmur_home() / "identity.key"


@dataclass(frozen=True, kw_only=True, slots=True)
class JoinOptions:
    """What `murmur run` was told about joining; `from_cli` checks the combinations."""

    swarm: str
    initial_peers: tuple[str, ...]
    identity: Path
    """The peer's Ed25519 key file: its identity in the swarm. The DHT's libp2p id is not kept (fresh each start)."""
    run_key: bytes | None = None
    manifest_path: Path | None = None
    owner_key: Path | None = None
    listen: tuple[str, int] | None = None
    """None: client-only."""
    announce: str | None = None
    observe: bool = False
    """Announce the IP a bootstrap node sees this peer at (neither --listen nor --client-only was given)."""
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    announce_ttl_s: float = 60.0
    dht_start_timeout_s: float = 60.0
    pins_path: Path | None = None
    addrs_file: Path | None = None
    """Where to write the DHT node's multiaddrs once this peer holds its identity: `murmur health` reads them."""

    @classmethod
    def from_cli(cls, o: dict) -> JoinOptions:
        """Build from the click options; ValueError names the flag that is wrong."""
        check_swarm_name(o["swarm"])
        if o["listen"] and o["client_only"]:
            raise ValueError("give --listen HOST:PORT (peers can dial you) or --client-only (behind NAT), not both")
        if o["announce"] and not o["listen"]:
            raise ValueError("--announce IP:PORT goes with --listen HOST:PORT (where the forwarded port arrives)")
        if o["owner_key"] and not o["manifest_path"]:
            raise ValueError("--key (the owner's key) goes with --manifest")
        listen = None if o["client_only"] else ANY_INTERFACE
        if o["listen"]:
            host, _, port = o["listen"].rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--listen must be HOST:PORT, got {o['listen']!r}")
            if host in ("0.0.0.0", "::", "[::]") and not o["announce"]:
                raise ValueError(f"--listen {o['listen']} is not an address others can dial: add --announce IP:PORT")
            listen = (host, int(port))
        return cls(
            swarm=o["swarm"],
            initial_peers=tuple(o["initial_peers"]),
            identity=o["identity"] or default_identity(),
            run_key=parse_run_key(o["run_key"]) if o["run_key"] else None,
            manifest_path=o["manifest_path"],
            owner_key=o["owner_key"],
            listen=listen,
            announce=o["announce"],
            observe=not o["listen"] and not o["client_only"],
            host_maddrs=tuple(o["host_maddrs"]),
            announce_ttl_s=o["announce_ttl"],
            dht_start_timeout_s=o["dht_start_timeout"],
            pins_path=o["pins"],
            addrs_file=o.get("addrs_file"),
        )


def read_manifest_file(opts: JoinOptions) -> SignedRunManifest:
    """The --manifest file, verified for this swarm and, with --key, signed by that key; ManifestError (or
    IdentityFileError for a --key that is not a key) otherwise. No network: it is checked before the DHT too."""
    assert opts.manifest_path is not None
    signed = load_json(opts.manifest_path, swarm=opts.swarm)
    if opts.owner_key is not None and Identity.load(opts.owner_key).public_key != signed.owner_public_key:
        raise ManifestError(f"--key {opts.owner_key} is not the key that signed {opts.manifest_path}")
    return signed


def obtain_manifest(swarm: Swarm, opts: JoinOptions, halt: threading.Event | None = None) -> SignedRunManifest:
    """Publish the manifest file (owner, or anyone holding a trusted one) or fetch it from the DHT."""
    pins = PinStore(opts.pins_path)
    if opts.manifest_path is None:
        return swarm.fetch_manifest(run_key=opts.run_key, pins=pins, halt=halt)
    signed = read_manifest_file(opts)
    if opts.owner_key is None:
        accept_owner(opts.swarm, signed, opts.run_key, pins)
    if not swarm.publish_manifest(signed):
        log.warning("no DHT node stored the manifest yet; it is published again at every refresh")
    return signed


async def _refuse_updates(update: ReceivedUpdate) -> None:
    """The membership process trains nothing; its policy admits no slice, so this is never reached."""


async def _serve(identity: Identity, member: Member, opts: JoinOptions) -> PeerServer:
    assert opts.listen is not None
    policy = WirePolicy(run_id=member.manifest.run_id, expected_shapes=lambda _slice: None, lookup=member.lookup)
    server = PeerServer(
        identity=identity,
        policy=policy,
        on_update=_refuse_updates,
        status=lambda: PeerStatus(round=member.round, slice=member.slice),
        config=ServerConfig(host=opts.listen[0], port=opts.listen[1]),
    )
    await server.start()
    return server


async def own_endpoint(member: Member, server: PeerServer, opts: JoinOptions) -> PeerServer | None:
    """Set the endpoint `member` announces: --announce, else --listen's, else (neither --listen nor --client-only)
    the IP a bootstrap node sees this peer at, with the port `server` took. When no node can tell, the peer goes
    client-only (the server is stopped; None is returned), as it does when the endpoint proves unreachable."""
    assert opts.listen is not None
    if opts.announce or not opts.observe:
        member.endpoint = opts.announce or f"{opts.listen[0]}:{server.port}"
        return server
    host, via = await observe_host(member.swarm.dht, opts.initial_peers)
    if not host:
        print(f"endpoint: no bootstrap node could tell this peer its address ({via}); continuing client-only",
              flush=True)  # fmt: skip
        await server.stop()
        return None
    member.endpoint = f"[{host}]:{server.port}" if ":" in host else f"{host}:{server.port}"
    print(f"endpoint: {via} sees this peer at {host}; serving on port {server.port} (--listen and --announce choose)",
          flush=True)  # fmt: skip
    return server


async def check_endpoint(member: Member, server: PeerServer, opts: JoinOptions) -> PeerServer | None:
    """Have a bootstrap node dial our endpoint; when it cannot, say what to do and go client-only."""
    probe = member.announcement(get_dht_time() + 60)
    result = await check_reachability(member.swarm.dht, opts.initial_peers, probe)
    print(result.advice(member.endpoint), flush=True)
    if result.reachable is False:
        log.warning("continuing as a client-only peer (announcing no endpoint)")
        member.endpoint = ""
        await server.stop()
        await asyncio.to_thread(member.announce)
        return None
    return server


def _say(text: str) -> None:
    print(text, flush=True)


async def refresh_until(stop: asyncio.Event, member: Member, say: Callable[[str], None] = _say) -> None:
    """Refresh every TTL/3, on a fixed beat (a slow refresh does not push the next one back, or the announcement
    could expire between two); `say` a line (stdout; the daemon's status reporter) whenever the live set or
    this peer's slice changes."""
    every = member.swarm.config.refresh_every_s
    shown: tuple = ()
    loop = asyncio.get_running_loop()
    due = loop.time() + every
    while True:
        try:
            await asyncio.wait_for(stop.wait(), timeout=max(0.0, due - loop.time()))
            return
        except asyncio.TimeoutError:
            pass
        due = max(due + every, loop.time())  # after a stall (a frozen process), refresh now and keep the beat
        try:
            await asyncio.to_thread(member.refresh)
        except (OSError, RuntimeError, asyncio.TimeoutError) as exc:
            log.warning("refresh failed (%r); retrying in %.0fs", exc, every)
            continue
        coverage = slice_counts(member.peers, member.num_slices)
        state = (tuple(p.peer_id for p in member.peers), member.slice)
        if state != shown:
            shown = state
            say(f"peers: {len(member.peers)} live, slice coverage {coverage}, mine {member.slice}")


@dataclass(frozen=True, slots=True)
class Joined:
    """What every joining process has once the manifest is verified: who it is, the swarm, the run."""

    identity: Identity
    swarm: Swarm
    signed: SignedRunManifest
    run: RunConfig
    stop: asyncio.Event
    """Set by SIGTERM/SIGINT: the caller's work ends."""
    halt: threading.Event
    """The same signal, for work in threads (a manifest fetch that waits)."""
    signalled: threading.Event
    """Set by SIGTERM/SIGINT only: `stop` and `halt` are also set by the daemon itself (its DHT process died)."""


@asynccontextmanager
async def joined(opts: JoinOptions, *, software_version: str, detail: Callable[[RunConfig], str] = lambda _run: ""
                 ) -> AsyncIterator[Joined]:  # fmt: skip
    """Signals, identity, DHT, swarm, verified manifest and RunConfig; the DHT is shut down on the way out.

    The DHT node (a `TetheredDHT`: it and p2pd die with this process, however it dies) gets a fresh libp2p
    identity each start: announcements are signed by `opts.identity` and stored under its peer id, so nobody
    pins the libp2p one, and a restart right after a crash never finds it "already taken". Raises
    DHTStartError/ManifestError (MurmurError) on failure, JoinInterrupted when a signal ends the wait.
    """
    stop, halt, signalled = asyncio.Event(), threading.Event(), threading.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.info("%s: stopping", sig.name)  # with the "left swarm" line: how long a clean stop takes
        signalled.set()
        stop.set()
        halt.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    created = not opts.identity.exists()
    identity = Identity.load_or_create(opts.identity)
    print(f"identity {opts.identity} ({'new' if created else 'kept'}): peer {identity.peer_id[:16]}", flush=True)
    dht = await asyncio.to_thread(
        start_dht, initial_peers=opts.initial_peers, host_maddrs=opts.host_maddrs,
        startup_timeout_s=opts.dht_start_timeout_s,
    )  # fmt: skip
    try:
        with identity_lock(opts.identity, identity.peer_id, opts.swarm):  # after the DHT's fork: not its to hold
            if opts.addrs_file is not None:  # under the lock: a refused twin must not overwrite the running peer's
                await asyncio.to_thread(write_addrs, dht, opts.addrs_file)
            yield await _verified_run(dht, identity, opts, software_version, detail, stop, halt, signalled)
    finally:
        await asyncio.to_thread(dht.shutdown)


async def _verified_run(dht: TetheredDHT, identity: Identity, opts: JoinOptions, software_version: str,
                        detail: Callable[[RunConfig], str], stop: asyncio.Event, halt: threading.Event,
                        signalled: threading.Event) -> Joined:  # fmt: skip
    """The swarm on `dht`, its manifest (published or fetched, verified) and the run config it holds."""
    config = SwarmConfig(swarm=opts.swarm, initial_peers=opts.initial_peers, announce_ttl_s=opts.announce_ttl_s)
    swarm = Swarm(dht, config)
    print(f"DHT up; looking for swarm {opts.swarm} via {len(opts.initial_peers)} initial peer(s)", flush=True)
    signed = await asyncio.to_thread(obtain_manifest, swarm, opts, halt)
    try:
        run = RunConfig.from_manifest(signed.manifest)
    except ValueError as exc:
        raise ManifestError(f"the run's manifest is not usable by murmur {software_version}: {exc}") from exc
    print(f"run {signed.run_id} by owner {signed.owner_key_hex}: {run.preset}, K={run.slices.num_slices}, "
          f"{run.method}{detail(run)}", flush=True)  # fmt: skip
    return Joined(identity, swarm, signed, run, stop, halt, signalled)


def write_addrs(dht: TetheredDHT, path: Path) -> None:
    """The DHT node's multiaddrs, one a line, into `path` (replaced atomically: a reader never sees half)."""
    atomic_write(path, "".join(f"{m}\n" for m in dht.get_visible_maddrs()).encode())


@contextmanager
def identity_lock(path: Path, peer_id: str, swarm: str) -> Iterator[None]:
    """One running peer per identity in a swarm: two would announce under one peer id and take each other's
    partners (in two swarms, one identity is two peers). An advisory lock on DATA/locks/SWARM-PEER.lock, by peer id
    so that a copy of the key file counts too; the kernel drops it when the process dies, however it dies, so a
    restart right after a SIGKILL is not refused. SetupError names the other process's pid."""
    lock_path = murmur_home() / "locks" / f"{swarm}-{peer_id[:16]}.lock"
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SetupError(f"cannot open the lock file {lock_path} of --identity {path} ({exc.strerror or exc})") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise SetupError(f"--identity {path} is in use by another murmur peer in swarm {swarm} (pid {holder}); "
                             "give this one its own --identity FILE") from None  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


async def enter(member: Member, server: PeerServer | None, opts: JoinOptions) -> PeerServer | None:
    """Take a slice and announce it; then have the endpoint checked (client-only if unreachable) and say so.

    Returns the server still serving (None when the peer went client-only or never listened)."""
    await asyncio.to_thread(member.join)
    if server is not None:
        server = await check_endpoint(member, server, opts)
    print(f"joined swarm {opts.swarm} as {member.identity.peer_id} slice {member.slice} "
          f"endpoint {member.endpoint or 'client-only'}", flush=True)  # fmt: skip
    return server


@contextmanager
def swarm_view(swarm: str, initial_peers: tuple[str, ...], *, timeout_s: float) -> Iterator[Swarm]:
    """A read-only look at a swarm (`murmur status`, `murmur eval`): a client-mode DHT on loopback that
    announces nothing and serves nothing, shut down on the way out."""
    dht: TetheredDHT = start_dht(initial_peers=initial_peers, host_maddrs=("/ip4/127.0.0.1/tcp/0",),
                                 startup_timeout_s=timeout_s, client_mode=True)  # fmt: skip
    try:
        yield Swarm(dht, SwarmConfig(swarm=swarm, initial_peers=initial_peers))
    finally:
        dht.shutdown()


async def run_join(opts: JoinOptions, *, software_version: str) -> None:
    """Join and stay until SIGTERM/SIGINT, refreshing the announcement; raises MurmurError on failure."""
    try:
        async with joined(opts, software_version=software_version) as session:
            member = Member(session.swarm, session.identity, session.signed, endpoint="",
                            software_version=software_version)  # fmt: skip
            server: PeerServer | None = None
            try:
                with stopping_is_no_error(session.signalled):
                    if opts.listen is not None:
                        server = await _serve(session.identity, member, opts)  # stopped below if what follows fails
                        server = await own_endpoint(member, server, opts)
                    server = await enter(member, server, opts)
                    await refresh_until(session.stop, member)
            finally:
                if server is not None:
                    await server.stop()
    except JoinInterrupted as exc:
        log.info("%s", exc)
    log.info("left swarm %s", opts.swarm)


@contextmanager
def stopping_is_no_error(signalled: threading.Event) -> Iterator[None]:
    """After SIGTERM/SIGINT, what the DHT's end breaks is a stop (JoinInterrupted), not an error with a traceback.

    Ctrl-C in a terminal signals the whole process group, p2pd too: whatever was asking the DHT when it went fails
    (fresh22: FileNotFoundError for p2pd's vanished socket while a bootstrap node was asked for our address). The
    user asked to stop. Without a signal the same errors are raised as they are."""
    try:
        yield
    except (OSError, EOFError, P2PDaemonError, P2PHandlerError, DHTStopped) as exc:
        if not signalled.is_set():
            raise
        log.debug("the stop interrupted a DHT call", exc_info=True)
        raise JoinInterrupted(f"stopped ({type(exc).__name__} from the stopping DHT)") from None
