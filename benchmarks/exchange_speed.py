"""Exchange speed: one gossip push-pull of a `124m`-sized update between two processes over shaped links.

    .venv/bin/python -m benchmarks.exchange_speed [--rates 10,100,1000] [--preset 124m] [--json PATH]
        [--modes before,serial,duplex --before-ref REF]

Two real processes, each in its own network namespace (benchmarks/netns.py), run the daemon's wire code: a
`PeerServer` that replies with its own update, and a `PeerClient` that connects (pinned TLS, as the daemon does
for every exchange) and pushes. The update is the int8 pseudo-gradient of every parameter of the preset
(protocol/codec.py, the run's default codec); each side decodes and checks what it receives, as in a real round,
and hashes its own update once, before the exchanges, as the daemon's training thread does (gossip.encode_update;
the `before` code hashes at every seal, on the exchange's path).
Both ends of the client's and the server's links are limited with tbf to the same rate (uploads and downloads).

Reported per rate and mode, as ratios to the physical limit `payload bytes / link rate` (the time one update
needs on the link): the whole exchange (connect, push, partner decodes, reply, we decode), and its push half
(until the server has delivered the update; both processes read the same clock). Bytes on the wire are the
client link's Ethernet frames (TCP/IP, TLS, HTTP/2 and gRPC framing included) against the payloads it moved.
An unshaped row shows the processing floor of this machine (veth at memory speed).

Modes run side by side, interleaved at every rate, each with its own pair of processes (`--modes`):
`duplex` (the reply streams while the push lands, both decoded as they land: can reach 1.0), `serial` (the same
code with the reply after the push, the order before full duplex: cannot beat 2.0), and `before`: the code of the
git revision `--before-ref` (extracted with `git archive`), for a same-machine before/after. "client CPU" is the
client process's CPU time per exchange (every thread: grpc, TLS, hashing, decoding).
Needs root (network namespaces, as benchmarks/netns.py); takes about 4 minutes per mode with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from benchmarks.netns import Network, unavailable
from peer.core.model import Transformer, preset
from protocol.codec import CodecConfig, encode
from protocol.identity import Identity
from protocol.updates import OutgoingUpdate, ReceivedUpdate, WirePolicy

RUN_ID = "e5" * 32
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = Path(__file__).with_name("results") / "exchange_speed.json"
DEADLINE_S = 900.0
"""Per exchange, on both sides: 10 Mbit/s moves a 124m update each way in about 140 s."""
REPEAT_BUDGET_S = 40.0
"""Repeat an exchange at a rate while the repeats' physical limit stays under this (at least once)."""


def update_shapes(preset_name: str) -> dict[str, tuple[int, ...]]:
    """The wire table of an update carrying every parameter of the preset ("delta/<name>")."""
    with torch.device("meta"):
        model = Transformer(preset(preset_name))
    return {f"delta/{name}": tuple(p.shape) for name, p in model.named_parameters()}


def make_update(shapes: Mapping[str, tuple[int, ...]], codec: CodecConfig, seed: int) -> OutgoingUpdate:
    """A pseudo-gradient-sized update of random values (int8 payloads do not depend on the values' scale)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: encode(torch.randn(shape, generator=generator) * 1e-3, codec) for name, shape in shapes.items()}
    return OutgoingUpdate(round=0, slice=0, tensors=tensors)


def _policy(shapes: Mapping[str, tuple[int, ...]], codec: CodecConfig, keys: dict[str, bytes]) -> WirePolicy:
    return WirePolicy(run_id=RUN_ID, expected_shapes=lambda k: shapes if k == 0 else None, lookup=keys.get, codec=codec)


def _emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


# ------------------------------------------------------------------------------ the two processes


async def serve(args: argparse.Namespace) -> None:
    """The partner: a PeerServer on the namespace's address replying with its own update, until SIGTERM."""
    from protocol.service import PeerServer, ServerConfig

    me, other = Identity.load(args.dir / "server.id"), Identity.load(args.dir / "client.id")
    codec, shapes = CodecConfig(name=args.codec), update_shapes(args.preset)
    reply = await asyncio.to_thread(make_update, shapes, codec, 2)

    async def on_update(update: ReceivedUpdate) -> None:
        _emit(event="received", round=update.round, at=time.time(), payload_bytes=update.payload_bytes)

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    server = PeerServer(
        identity=me, policy=_policy(shapes, codec, {other.peer_id: other.public_key}), on_update=on_update,
        reply_for=lambda _r, _k: reply,  # as the daemon's: one update per round, its digest computed once
        config=ServerConfig(host=args.host, exchange_timeout_s=DEADLINE_S, duplex=not args.serial),
    )  # fmt: skip
    async with server:
        _emit(event="listening", port=server.port)
        await stop.wait()


async def push(args: argparse.Namespace) -> None:
    """The daemon's side of an exchange, once per "go ROUND" line on stdin (connect, push, read the reply)."""
    from protocol.client import PeerClient

    me, other = Identity.load(args.dir / "client.id"), Identity.load(args.dir / "server.id")
    codec, shapes = CodecConfig(name=args.codec), update_shapes(args.preset)
    update = await asyncio.to_thread(make_update, shapes, codec, 1)
    payload = sum(len(enc.payload) for enc in update.tensors.values())
    policy = _policy(shapes, codec, {other.peer_id: other.public_key})
    _emit(event="ready", payload_bytes=payload, tensors=len(shapes), params=sum(map(math.prod, shapes.values())))
    while line := await asyncio.to_thread(sys.stdin.readline):
        round_ = int(line.split()[1])
        outgoing = OutgoingUpdate(round_, 0, update.tensors)
        await asyncio.to_thread(outgoing.digest)  # before the exchange, as in the daemon's training thread
        started, cpu = time.time(), time.process_time()
        async with PeerClient.connect(
            args.endpoint, peer_id=other.peer_id, tls_fingerprint=other.tls_fingerprint, identity=me,
            policy=policy, tls_certificate=other.tls_cert_pem, deadline=DEADLINE_S, duplex=not args.serial,
        ) as client:  # fmt: skip
            reply = await client.exchange(outgoing)
        _emit(event="exchanged", round=round_, started=started, seconds=time.time() - started,
              cpu_s=time.process_time() - cpu, frames_sent=client.bytes_sent, frames_received=client.bytes_received,
              reply_payload_bytes=None if reply is None else reply.payload_bytes)  # fmt: skip


# ------------------------------------------------------------------------------ the orchestrator


class Worker:
    """One benchmark process inside a namespace; its JSON lines arrive on a queue."""

    def __init__(self, argv: list[str], log: Path, cwd: Path = ROOT) -> None:
        self.log = log
        self._stderr = open(log, "w")  # closed in stop()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                      text=True, env=env, cwd=cwd, start_new_session=True)  # fmt: skip
        self.lines: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))

    def next(self, event: str, timeout: float) -> dict:
        """The next JSON line (which must be `event`); fails with the process's stderr when none comes."""
        try:
            got = self.lines.get(timeout=timeout)
        except queue.Empty:
            tail = "\n".join(self.log.read_text().splitlines()[-30:])
            raise RuntimeError(f"no {event!r} from {self.popen.args[4:8]} in {timeout:.0f}s:\n{tail}") from None
        if got.get("event") != event:
            raise RuntimeError(f"expected {event!r}, got {got}")
        return got

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the whole group."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)
        self._stderr.close()


def _role(role: str, args: argparse.Namespace, workdir: Path, mode: str, *extra: str) -> list[str]:
    flags = ["--serial"] if mode == "serial" else []  # `before` runs the old tree's script: no new flags
    return [sys.executable, "-m", "benchmarks.exchange_speed", role, "--dir", str(workdir), "--preset", args.preset,
            "--codec", args.codec, *flags, *extra]  # fmt: skip


def before_tree(ref: str, workdir: Path) -> Path:
    """The files of git revision `ref` of this repository, extracted under `workdir` (its workers import them)."""
    tree = workdir / "before"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


class Pair:
    """One mode's server (on host a) and client (on host b)."""

    def __init__(self, mode: str, args: argparse.Namespace, workdir: Path, hosts: tuple, cwd: Path) -> None:
        a, b = hosts
        self.mode, self.server, self.client = mode, None, None
        self.server = Worker(a.argv(_role("serve", args, workdir, mode, "--host", a.address)),
                             workdir / f"{mode}-server.log", cwd)  # fmt: skip
        port = self.server.next("listening", 300)["port"]
        push_argv = _role("push", args, workdir, mode, "--endpoint", a.endpoint(port))
        self.client = Worker(b.argv(push_argv), workdir / f"{mode}-client.log", cwd)
        self.ready = self.client.next("ready", 300)

    def exchange(self, round_: int) -> tuple[dict, dict]:
        """(the server's "received", the client's "exchanged") of one exchange."""
        self.client.send(f"go {round_}")
        return self.server.next("received", DEADLINE_S + 60), self.client.next("exchanged", DEADLINE_S + 60)

    def stop(self) -> None:
        for worker in (self.client, self.server):
            if worker is not None:
                worker.stop()


def measure(args: argparse.Namespace, workdir: Path) -> dict:
    """Each mode's processes in the two namespaces; rows per rate (the unshaped floor first), modes interleaved."""
    Identity.generate().save(workdir / "server.id")
    Identity.generate().save(workdir / "client.id")
    rows, pairs = [], []
    with Network() as net:
        a, b = net.add_host("server"), net.add_host("client")
        try:
            for mode in args.modes:
                cwd = before_tree(args.before_ref, workdir) if mode == "before" else ROOT
                pairs.append(Pair(mode, args, workdir, (a, b), cwd))
            ready = pairs[0].ready
            print(f"{args.preset}: {ready['params'] / 1e6:.1f}M parameters in {ready['tensors']} tensors, "
                  f"{args.codec} payload {ready['payload_bytes'] / 1e6:.1f} MB each way", flush=True)  # fmt: skip
            exchange_round = 0
            for rate in [None, *args.rates]:
                for host in (a, b):
                    net.shape(host, rate)
                limit = math.inf if rate is None else ready["payload_bytes"] * 8 / (rate * 1e6)
                repeats = 2 if rate is None else max(1, min(args.max_repeats, int(REPEAT_BUDGET_S // limit)))
                for _ in range(repeats):
                    exchange_round += 1
                    for pair in pairs:
                        before = net.link_bytes(b)
                        received, done = pair.exchange(exchange_round)
                        row = _row(rate, limit, ready["payload_bytes"], received, done, before, net.link_bytes(b))
                        rows.append({"mode": pair.mode, **row, "load_average": os.getloadavg()[0]})
                        print(f"{pair.mode:>7} {_format(row)}", flush=True)
        finally:
            for pair in pairs:
                pair.stop()
    return {"preset": args.preset, "codec": args.codec, "params": ready["params"], "tensors": ready["tensors"],
            "payload_bytes": ready["payload_bytes"], "modes": args.modes, "before_ref": args.before_ref,
            "rows": rows}  # fmt: skip


def _row(rate: float | None, limit: float, payload: int, received: dict, done: dict,
         before: tuple[int, int], after: tuple[int, int]) -> dict:  # fmt: skip
    wire_up, wire_down = after[0] - before[0], after[1] - before[1]
    push_s = received["at"] - done["started"]
    moved = payload + done["reply_payload_bytes"]
    return {
        "rate_mbit": rate, "limit_s": None if rate is None else limit, "exchange_s": done["seconds"],
        "push_s": push_s, "exchange_over_limit": None if rate is None else done["seconds"] / limit,
        "push_over_limit": None if rate is None else push_s / limit,
        "goodput_mbit": 2 * payload * 8 / done["seconds"] / 1e6,
        "wire_bytes_up": wire_up, "wire_bytes_down": wire_down,
        "grpc_frame_bytes_up": done["frames_sent"], "grpc_frame_bytes_down": done["frames_received"],
        "wire_over_payload": (wire_up + wire_down) / moved,
        "frames_over_payload": (done["frames_sent"] + done["frames_received"]) / moved,
        "client_cpu_s": done.get("cpu_s"),  # every thread of the client process (grpc's, TLS, decoding)
    }  # fmt: skip


def _format(row: dict) -> str:
    rate = "unshaped" if row["rate_mbit"] is None else f"{row['rate_mbit']:g} Mbit/s"
    return (f"{rate:>13}  limit {_num(row['limit_s'], 's'):>7}  exchange {row['exchange_s']:7.1f}s "
            f"({_num(row['exchange_over_limit'])})  push {row['push_s']:7.1f}s ({_num(row['push_over_limit'])})  "
            f"goodput {row['goodput_mbit']:7.1f} Mbit/s  wire/payload {row['wire_over_payload']:.4f}  "
            f"client CPU {_num(row['client_cpu_s'], 's')}")  # fmt: skip


def table(result: dict) -> str:
    """The markdown table of a result: medians per rate and mode, and the load average while they ran."""
    lines = [
        "| link | mode | physical limit (payload / rate) | exchange | exchange / limit | push / limit | goodput | "
        "wire bytes / payload | gRPC frames / payload | client CPU | load average |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rate in dict.fromkeys(row["rate_mbit"] for row in result["rows"]):
        for mode in result.get("modes", ["duplex"]):
            rows = [r for r in result["rows"] if r["rate_mbit"] == rate and r.get("mode", "duplex") == mode]
            if not rows:
                continue
            med = {k: _median([r[k] for r in rows]) for k in rows[0] if k not in ("rate_mbit", "mode")}
            name = "unshaped veth" if rate is None else f"{rate:g} Mbit/s"
            lines.append(f"| {name} ({len(rows)}x) | {mode} | {_num(med['limit_s'], ' s')} | "
                         f"{med['exchange_s']:.2f} s | {_num(med['exchange_over_limit'])} | "
                         f"{_num(med['push_over_limit'])} | {med['goodput_mbit']:.0f} Mbit/s | "
                         f"{med['wire_over_payload']:.4f} | {med['frames_over_payload']:.4f} | "
                         f"{_num(med.get('client_cpu_s'), ' s')} | {_num(med.get('load_average'))} |")  # fmt: skip
    return "\n".join(lines)


def _num(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def _median(values: list) -> float | None:
    if any(v is None for v in values):
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", nargs="?", choices=["measure", "serve", "push"], default="measure",
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[10.0, 100.0, 1000.0],
                        help="link rates in Mbit/s, comma-separated")  # fmt: skip
    parser.add_argument("--preset", default="124m")
    parser.add_argument("--codec", default="int8")
    parser.add_argument("--max-repeats", type=int, default=3, help="exchanges per rate at most")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["serial", "duplex"],
                        help="comma-separated, run side by side: before (needs --before-ref), serial, duplex")
    parser.add_argument("--before-ref", help="git revision whose code the `before` mode runs (e.g. HEAD)")
    parser.add_argument("--serial", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.role != "measure":
        import uvloop

        uvloop.run(serve(args) if args.role == "serve" else push(args))
        return
    if set(args.modes) - {"before", "serial", "duplex"} or ("before" in args.modes) != bool(args.before_ref):
        parser.error("--modes takes before, serial and duplex; `before` goes with --before-ref, and only with it")
    reason = unavailable()
    if reason is not None:
        parser.exit(1, f"exchange_speed needs network namespaces: {reason}\n")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="exchange-speed-") as tmp:
        result = measure(args, Path(tmp))
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                         "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    print(table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
