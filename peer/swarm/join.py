"""The one join sequence, shared by `murmur join` (membership only) and `murmur run` (peer/node/daemon.py).

Order of a join: identity -> DHT (with a clear error if it cannot start) -> manifest (publish with the
owner key, or fetch and verify against --run-key / the pin) -> RunConfig from it (`joined`) -> PeerService
on --listen (unless --client-only) -> slice (least covered) and first announcement -> reachability test by
a bootstrap node (unreachable: say which port to open and continue client-only) (`enter`) -> the caller's
work (`murmur join`: refresh every TTL/3) until SIGTERM/SIGINT -> stop the server, then the DHT; return
normally (exit code 0). `swarm_view` is the read-only variant for commands that only look (status, eval).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from hivemind.utils import get_dht_time

from peer.config import RunConfig
from peer.swarm.membership import Member, Swarm, SwarmConfig, check_reachability, slice_counts
from protocol.dht import TetheredDHT, start_dht
from protocol.errors import JoinInterrupted, ManifestError
from protocol.identity import Identity
from protocol.logs import get_logger
from protocol.manifest import PinStore, SignedRunManifest, accept_owner, load_json, parse_run_key
from protocol.records import check_swarm_name
from protocol.service import PeerServer, PeerStatus, ServerConfig
from protocol.updates import ReceivedUpdate, WirePolicy

log = get_logger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class JoinOptions:
    """What `murmur join` was told; `from_cli` checks the combinations."""

    swarm: str
    initial_peers: tuple[str, ...]
    identity: Path
    """The peer's Ed25519 key file: its identity in the swarm. The DHT's libp2p id is not kept (fresh each start)."""
    run_key: bytes | None = None
    manifest_path: Path | None = None
    owner_key: Path | None = None
    listen: tuple[str, int] | None = None
    announce: str | None = None
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    announce_ttl_s: float = 60.0
    dht_start_timeout_s: float = 60.0
    pins_path: Path | None = None

    @classmethod
    def from_cli(cls, o: dict) -> JoinOptions:
        """Build from the click options; ValueError names the flag that is wrong."""
        check_swarm_name(o["swarm"])
        if bool(o["listen"]) == bool(o["client_only"]):
            raise ValueError("give either --listen HOST:PORT (peers can dial you) or --client-only (behind NAT)")
        if o["owner_key"] and not o["manifest_path"]:
            raise ValueError("--key (the owner's key) goes with --manifest")
        listen = None
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
            identity=o["identity"],
            run_key=parse_run_key(o["run_key"]) if o["run_key"] else None,
            manifest_path=o["manifest_path"],
            owner_key=o["owner_key"],
            listen=listen,
            announce=o["announce"],
            host_maddrs=tuple(o["host_maddrs"]),
            announce_ttl_s=o["announce_ttl"],
            dht_start_timeout_s=o["dht_start_timeout"],
            pins_path=o["pins"],
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


@asynccontextmanager
async def joined(opts: JoinOptions, *, software_version: str, detail: Callable[[RunConfig], str] = lambda _run: ""
                 ) -> AsyncIterator[Joined]:  # fmt: skip
    """Signals, identity, DHT, swarm, verified manifest and RunConfig; the DHT is shut down on the way out.

    The DHT node (a `TetheredDHT`: it and p2pd die with this process, however it dies) gets a fresh libp2p
    identity each start: announcements are signed by `opts.identity` and stored under its peer id, so nobody
    pins the libp2p one, and a restart right after a crash never finds it "already taken". Raises
    DHTStartError/ManifestError (MurmurError) on failure, JoinInterrupted when a signal ends the wait.
    """
    stop, halt = asyncio.Event(), threading.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.info("%s: stopping", sig.name)  # with the "left swarm" line: how long a clean stop takes
        stop.set()
        halt.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    identity = Identity.load_or_create(opts.identity)
    dht = await asyncio.to_thread(
        start_dht, initial_peers=opts.initial_peers, host_maddrs=opts.host_maddrs,
        startup_timeout_s=opts.dht_start_timeout_s,
    )  # fmt: skip
    try:
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
        yield Joined(identity, swarm, signed, run, stop, halt)
    finally:
        await asyncio.to_thread(dht.shutdown)


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
                if opts.listen is not None:
                    server = await _serve(session.identity, member, opts)
                    member.endpoint = opts.announce or f"{opts.listen[0]}:{server.port}"
                server = await enter(member, server, opts)
                await refresh_until(session.stop, member)
            finally:
                if server is not None:
                    await server.stop()
    except JoinInterrupted as exc:
        log.info("%s", exc)
    log.info("left swarm %s", opts.swarm)
