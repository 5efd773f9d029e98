"""Adversary peers for tests: a real `murmur run` whose outgoing updates are sabotaged inside its own process.

    python tests/adversaries.py KIND <murmur run args>

The process joins, announces and trains like an honest peer (same CLI, same daemon); only what it sends is
patched here, never in production code: pushes go through `PeerClient.exchange`, replies through the
`reply_for` callback the daemon hands to `PeerServer`, and both seal headers with `seal_update`. Its own outer
step stays honest, so it keeps sending attacks instead of collapsing on its own poison.

Kinds (what each should meet at an honest receiver):
- `scaled`  every tensor x1e4: finite and well-formed, so it passes the wire; the outer step clips it
- `nan`     NaN and Inf in every tensor: the wire refuses it (non_finite) and bans the sender
- `shape`   every tensor one row short: the wire refuses the header (wrong_shape) and bans the sender
- `replay`  after its first update, re-sends that same signed update forever: refused as a replay
- `badkey`  signs with a key that is not its announced one: refused (bad_signature)
- `flood`   after one honest round it stops training and pushes FLOOD_PER_S duplicates a second to one
            partner at a time (`Flooder`): refused over the per-peer limit (RESOURCE_EXHAUSTED, over_limit),
            then banned
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # procs.py beside this file, also when run as a script
from procs import Proc, Procs, murmur

from peer import trainer as trainer_module
from peer.roundline import parse_all
from peer.trainer import TrainedRound
from protocol import client as client_module
from protocol import service as service_module
from protocol.codec import CodecConfig, Encoded, decode, encode
from protocol.errors import BannedPeer, MurmurError, Reason
from protocol.identity import Identity, update_signing_bytes
from protocol.updates import OutgoingUpdate

KINDS = ("scaled", "nan", "shape", "replay", "badkey", "flood")
SCALE = 1e4
FLOOD_PER_S = 50.0
"""Over the per-peer exchange limit (2 x 240 a minute), well under the per-address one (4440 a minute)."""
FLOOD_TARGET_S = 120.0

Sabotage = Callable[[OutgoingUpdate], OutgoingUpdate]


def _map_tensors(update: OutgoingUpdate, change: Callable[[torch.Tensor], torch.Tensor]) -> OutgoingUpdate:
    """The update with every tensor decoded, changed and re-encoded with its codec."""
    out = {}
    for name, enc in update.tensors.items():
        config = CodecConfig(name=enc.codec)
        out[name] = encode(change(decode(enc, config)), config)
    return replace(update, tensors=out)


def scaled(update: OutgoingUpdate) -> OutgoingUpdate:
    return _map_tensors(update, lambda t: t * SCALE)


def shape(update: OutgoingUpdate) -> OutgoingUpdate:
    return _map_tensors(update, lambda t: t[:-1] if t.shape[0] > 1 else torch.cat([t, t]))


def nan(update: OutgoingUpdate) -> OutgoingUpdate:
    """NaN and Inf written as raw bf16 (the codecs refuse to encode them; a raw payload is what an attacker sends)."""
    out = {}
    for name, enc in update.tensors.items():
        values = torch.zeros(enc.shape, dtype=torch.bfloat16).reshape(-1)
        values[0::2], values[1::2] = float("nan"), float("inf")
        out[name] = Encoded("bf16", enc.dtype, enc.shape, values.view(torch.uint8).numpy().tobytes())
    return replace(update, tensors=out)


class Replayer:
    """Sends the first update it saw again and again (identical bytes: Ed25519 signatures are deterministic)."""

    def __init__(self) -> None:
        self.first: OutgoingUpdate | None = None

    def __call__(self, update: OutgoingUpdate) -> OutgoingUpdate:
        if self.first is None:
            self.first = update
        return self.first


def patch_outgoing(sabotage: Sabotage) -> None:
    """Every update this process pushes or replies with goes through `sabotage` first."""
    exchange = client_module.PeerClient.exchange

    async def sabotaged_exchange(self: client_module.PeerClient, update: OutgoingUpdate):
        return await exchange(self, sabotage(update))

    client_module.PeerClient.exchange = sabotaged_exchange
    server_init = service_module.PeerServer.__init__

    def init(self: service_module.PeerServer, *args: object, reply_for: Callable, **kwargs: object) -> None:
        def sabotaged_reply(round: int, slice_index: int) -> OutgoingUpdate | None:
            outgoing = reply_for(round, slice_index)
            return None if outgoing is None else sabotage(outgoing)

        server_init(self, *args, reply_for=sabotaged_reply, **kwargs)

    service_module.PeerServer.__init__ = init


def patch_bad_key() -> None:
    """Headers name this peer as sender but carry a signature by a fresh key that nobody announced."""
    impostor = Identity.generate()
    seal = service_module.seal_update

    def forged(update: OutgoingUpdate, *, identity: Identity, run_id: str, recipient: str):
        header = seal(update, identity=identity, run_id=run_id, recipient=recipient)
        message = update_signing_bytes(run_id=run_id, round=header.round, slice_index=header.slice,
                                       payload_sha256=header.payload_sha256, sender=header.sender,
                                       recipient=recipient)  # fmt: skip
        header.signature = impostor.sign(message)
        return header

    client_module.seal_update = forged
    service_module.seal_update = forged


class Flooder:
    """Pushes to one partner at a time, FLOOD_PER_S calls a second (each a duplicate of its newest update), for
    up to FLOOD_TARGET_S or until that partner refuses it as banned, then moves to the next, forever.

    The rate stays under the per-address limit on purpose (on loopback every peer shares 127.0.0.1), so what is
    tested is the per-peer limit and ban, not an artefact of a shared address.
    """

    def __init__(self) -> None:
        self.targets: dict[str, tuple[tuple, dict]] = {}
        """peer id -> the arguments the daemon connected to it with."""
        self.latest: OutgoingUpdate | None = None
        self.task: asyncio.Task | None = None
        self.sent = self.refused = 0

    def install(self) -> None:
        connect, exchange = client_module.PeerClient.connect, client_module.PeerClient.exchange

        def recording_connect(*args: object, **kwargs: object):
            if kwargs.get("policy") is not None:  # an exchange client (late join's state fetch has none)
                self.targets[str(kwargs["peer_id"])] = (args, kwargs)
            if self.task is None:
                self.task = asyncio.get_running_loop().create_task(self.run())
            return connect(*args, **kwargs)

        async def recording_exchange(client: client_module.PeerClient, update: OutgoingUpdate):
            self.latest = update
            return await exchange(client, update)

        client_module.PeerClient.connect = staticmethod(recording_connect)
        client_module.PeerClient.exchange = recording_exchange
        train_round = trainer_module.Trainer.train_round
        trained: list[int] = []

        def train_once(trainer: trainer_module.Trainer, round: int, halt: threading.Event) -> TrainedRound:
            """One real round (an update to duplicate, partners to dial), then idle until stopped: a flooder
            spends its CPU on calls, and on a shared 2-core test machine so do the honest peers."""
            if trained:
                halt.wait()
                raise trainer_module.Halted
            trained.append(round)
            return train_round(trainer, round, halt)

        trainer_module.Trainer.train_round = train_once

    async def run(self) -> None:
        while True:
            for peer_id in list(self.targets):
                banned = await self.flood(peer_id)
                print(f"flood: {peer_id[:16]} {'banned us' if banned else 'still admits us'}; "
                      f"{self.sent} calls, {self.refused} refused so far", flush=True)  # fmt: skip
            await asyncio.sleep(1.0)

    async def flood(self, peer_id: str) -> bool:
        """FLOOD_PER_S pushes a second to `peer_id`; True once it says we are banned."""
        args, kwargs = self.targets[peer_id]
        banned = asyncio.Event()

        async def one(client: client_module.PeerClient) -> None:
            try:
                await client.exchange(self.latest)
            except BannedPeer:
                banned.set()
            except (MurmurError, OSError, asyncio.TimeoutError) as exc:
                if getattr(exc, "reason", None) == Reason.BANNED:
                    banned.set()
                self.refused += 1

        try:
            async with client_module.PeerClient.connect(*args, **kwargs) as client:
                calls: set[asyncio.Task] = set()
                deadline = time.monotonic() + FLOOD_TARGET_S
                while not banned.is_set() and time.monotonic() < deadline:
                    if len(calls) < 64 and self.latest is not None:
                        task = asyncio.ensure_future(one(client))
                        calls.add(task)
                        task.add_done_callback(calls.discard)
                        self.sent += 1
                    await asyncio.sleep(1 / FLOOD_PER_S)
                await asyncio.gather(*calls, return_exceptions=True)
        except (MurmurError, OSError) as exc:
            print(f"flood: cannot reach {peer_id[:16]}: {exc!r}", flush=True)
        return banned.is_set()


def install(kind: str) -> None:
    """Patch this process for `kind` (one of KINDS)."""
    if kind == "scaled":
        patch_outgoing(scaled)
    elif kind == "nan":
        patch_outgoing(nan)
    elif kind == "shape":
        patch_outgoing(shape)
    elif kind == "replay":
        patch_outgoing(Replayer())
    elif kind == "badkey":
        patch_bad_key()
    elif kind == "flood":
        Flooder().install()
    else:
        raise SystemExit(f"unknown adversary {kind!r}; choose one of {', '.join(KINDS)}")


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(f"usage: python tests/adversaries.py {{{','.join(KINDS)}}} <murmur run args>")
    install(argv[0])
    print(f"adversary {argv[0]} installed", flush=True)
    from peer.cli import main as murmur

    murmur(["run", *argv[1:]], prog_name="murmur")


if __name__ == "__main__":
    main(sys.argv[1:])


# ------------------------------------------------------------------ running swarms with them (tests, benchmark)

RUN_TOML = """
swarm = "{swarm}"
preset = "tiny"
[slices]
num_slices = 2
[inner]
steps_per_round = 5
batch_size = 4
warmup_steps = 5
total_steps = 2000
[outer]
clip = {clip}
[gossip]
fanout = 2
exchange_timeout_s = 5
"""
MADDR = r"^(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)$"
METRICS_AT = r"^metrics at (http://\S+/metrics)$"
EVAL_LINE = re.compile(r"^eval round (\d+) val_loss ([\d.]+)$")
SAMPLE = re.compile(r'^(murmur_rejected_updates_total|murmur_clipped_updates_total)(?:\{reason="([^"]*)"\})? (\S+)$')
HONEST = ("owner", "peer1", "peer2", "peer3")


@dataclass(slots=True)
class Swarm:
    """One swarm's processes: its honest peers (first the owner) and its adversaries."""

    tag: str
    honest: list[Proc]
    adversaries: list[Proc]
    metrics_urls: dict[str, str] = field(default_factory=dict)


def start_swarm(procs: Procs, tag: str, kinds: list[str], *, clip: float = 0.0) -> Swarm:
    """A bootstrap node, 4 honest `murmur run` peers and one adversary process per kind in `kinds`.

    Honest peers use identity files shared across swarms (`<name>.id` in the work dir), so a baseline and an
    attacked swarm train on the same data streams and differ only by the attack.
    """
    (procs.workdir / f"{tag}.toml").write_text(RUN_TOML.format(swarm=tag, clip=clip))
    made = procs.start(f"{tag}-create", murmur("create-run", "--config", f"{tag}.toml", "--key", f"{tag}-owner.key",
                                               "--out", f"{tag}-manifest.json"))  # fmt: skip
    boot = procs.start(f"{tag}-boot", murmur("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                                             "--identity", f"{tag}-boot.key"))  # fmt: skip
    maddr = boot.wait_for(MADDR, timeout=120).group(1)
    assert made.wait_exit(120) == 0, made.logs()
    run_key = made.lines[-1]

    def args(name: str, ident: str) -> list[str]:
        who = ["--manifest", f"{tag}-manifest.json", "--key", f"{tag}-owner.key"] if name == "owner" else []
        return ["--swarm", tag, "--initial-peers", maddr, "--identity", ident, "--announce-ttl", "6",
                "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--listen", "127.0.0.1:0", "--device", "cpu",
                "--eval-every", "1" if name in HONEST else "0", "--metrics-port", "0",
                *(who or ["--run-key", run_key])]  # fmt: skip

    def env(name: str) -> dict[str, str]:
        return {"MURMUR_HOME": str(procs.workdir / f"home-{tag}-{name}"), "OMP_NUM_THREADS": "1",
                "MURMUR_LOG_LEVEL": "INFO"}  # fmt: skip

    honest = [procs.start(f"{tag}-{n}", murmur("run", *args(n, f"{n}.id")), env=env(n)) for n in HONEST]
    honest[0].wait_for(r"^joined swarm", timeout=120)  # the manifest is published before others look for it
    script = str(Path(__file__).resolve())
    adversaries = [procs.start(f"{tag}-adv-{k}", [sys.executable, script, k, *args(k, f"{tag}-adv-{k}.id")],
                               env=env(f"adv-{k}")) for k in kinds]  # fmt: skip
    return Swarm(tag, honest, adversaries)


def loss_at(proc: Proc, rounds: int) -> float | None:
    """Validation loss of phi after this peer's `rounds`-th own round (its eval line), None before then."""
    lines = parse_all(proc.lines)
    if len(lines) < rounds:
        return None
    target = lines[rounds - 1].round
    return next((float(m[2]) for line in proc.lines if (m := EVAL_LINE.match(line)) and int(m[1]) == target), None)


def counters(url: str) -> dict[str, float]:
    """rejected:<reason> and clipped from a peer's /metrics."""
    with urllib.request.urlopen(url, timeout=20) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if m := SAMPLE.match(line):
            out["clipped" if m[1].startswith("murmur_clipped") else f"rejected:{m[2]}"] = float(m[3])
    return out


def finish(
    swarms: list[Swarm],
    rounds: int,
    timeout: float,
    expect: dict[str, set[str]] | None = None,
    counters_timeout: float = 180.0,
) -> dict[str, dict[str, object]]:
    """Wait for every honest peer's `rounds`-th round and its eval, read their counters, and stop everything.

    `expect` names, per swarm tag, counters that should become non-zero: they are read again every 2 s for up
    to `counters_timeout` s until they do (an attack lands when the attacker is picked as a partner, which can
    be after the rounds we compare losses at). Returns per swarm: `losses` (per honest peer at `rounds`),
    `loss` (their mean), `counters` (summed over honest peers) and `alive` (every honest peer still running).
    """
    procs = [p for s in swarms for p in s.honest + s.adversaries]
    started = time.monotonic()
    deadline = started + timeout
    while not all(loss_at(p, rounds) is not None for s in swarms for p in s.honest):
        dead = [p.name for s in swarms for p in s.honest if p.popen.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"honest peers exited: {dead}" if dead else f"not within {timeout}s: {rounds} rounds everywhere"
            raise AssertionError(why + "\n" + "\n".join(p.logs() for p in procs))
        time.sleep(1.0)
    print(f"{rounds} rounds on every honest peer after {time.monotonic() - started:.0f}s", flush=True)
    losses = {s.tag: {p.name: loss_at(p, rounds) for p in s.honest} for s in swarms}
    expect = expect or {}
    totals: dict[str, dict[str, float]] = {}
    alive: dict[str, bool] = {}

    def close(swarm: Swarm) -> None:
        """Last counters and liveness, then SIGTERM to all its processes at once (each takes seconds to stop)."""
        totals[swarm.tag] = _summed(swarm)
        alive[swarm.tag] = all(p.popen.poll() is None for p in swarm.honest)
        for p in swarm.honest + swarm.adversaries:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)

    for swarm in swarms:  # swarms that wait for no counter stop now, and stop taking the others' CPU
        if not expect.get(swarm.tag):
            close(swarm)
    waiting = [s for s in swarms if expect.get(s.tag)]
    deadline = time.monotonic() + counters_timeout
    seen: dict[str, float] = {}
    while waiting:
        now = {s.tag: _summed(s) for s in waiting}
        missing = {s.tag: {k for k in expect[s.tag] if not now[s.tag].get(k)} for s in waiting}
        for tag, keys in missing.items():
            for key in expect[tag] - keys:
                seen.setdefault(f"{tag}:{key}", round(time.monotonic() - started))
        if not any(missing.values()) or time.monotonic() > deadline:
            for swarm in waiting:
                close(swarm)
            break
        time.sleep(2.0)
    print(f"counters first seen, s after the swarms trained: {seen}", flush=True)
    for p in procs:
        p.terminate(timeout=30)
    results: dict[str, dict[str, object]] = {}
    for s in swarms:
        mean = sum(losses[s.tag].values()) / len(s.honest)
        results[s.tag] = {"losses": losses[s.tag], "loss": mean, "counters": totals[s.tag], "alive": alive[s.tag]}
    return results


def _summed(swarm: Swarm) -> dict[str, float]:
    """The honest peers' counters, summed."""
    total: dict[str, float] = {}
    for p in swarm.honest:
        url = p.wait_for(METRICS_AT, timeout=5).group(1)
        for key, value in counters(url).items():
            total[key] = total.get(key, 0.0) + value
    return total
