"""A peer's life under `murmur run`: join a swarm by name (peer/swarm/join.py), train it (peer/node/daemon.py), stop.

Order of a start: identity -> DHT -> manifest (published or fetched and verified, as `murmur join` does)
-> RunConfig -> model, data and slice optimiser (`peer/node/trainer.py`) -> PeerService with this run's wire policy
-> slice and announcement -> reachability -> the round loop (a checkpoint every `checkpoint_every` rounds, so
that a killed peer loses at most that many), until SIGTERM/SIGINT -> checkpoint -> server -> DHT; exit 0.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from peer.config import GossipConfig
from peer.core.devices import pick_device
from peer.core.fetch import FetchStopped
from peer.node import resume
from peer.node.daemon import Daemon
from peer.node.datapeers import shard_peers
from peer.node.gossip import STALE_ROUNDS
from peer.node.metrics import PeerInfo
from peer.node.ranks import Ranks
from peer.node.rounds import lower_median
from peer.node.trainer import Trainer
from peer.swarm.join import Joined, JoinOptions, enter, joined, own_endpoint, refresh_until, stopping_is_no_error
from peer.swarm.membership import Member
from protocol.errors import JoinInterrupted
from protocol.identity import Identity
from protocol.logs import get_logger
from protocol.manifest import murmur_home
from protocol.service import PeerServer, ServerConfig

log = get_logger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class DaemonOptions:
    """What `murmur run` was told beyond `murmur join`'s options."""

    join: JoinOptions
    device: str = "auto"
    checkpoint_dir: Path | None = None
    checkpoints_by_default: bool = False
    """Without `checkpoint_dir`, save in the data directory, by swarm and peer (`murmur run`'s default)."""
    checkpoint_every: int = 10
    """Also save every this many rounds (0: only on exit); a SIGKILL leaves no chance to save on exit."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port (0: any free one); None: no metrics server."""
    metrics_host: str = "127.0.0.1"
    data: str | None = None
    """A local corpus path; None uses the manifest's source (the embedded corpus)."""
    batch_size: int | None = None
    """Micro-batch; the manifest's batch is kept by gradient accumulation, so every peer trains alike."""
    grad_accum: int | None = None
    """Micro-batches per optimiser step; with batch_size their product must be the run's batch."""
    max_rounds: int = 0
    """Stop after this many rounds (0: until a signal)."""
    eval_every: int = 0
    """Validation loss of phi every this many rounds (0: never)."""
    overlap: bool = True
    """Exchange round r while round r+1 trains; partners' terms land a round late (see the module docstring)."""
    offload_outer: bool = False
    """Keep phi and the outer state in (pinned) host memory; the outer step runs there (peer/core/memory.py)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of keeping them."""
    gpus: int = 1
    """Processes (one per GPU, or gloo on the CPU) that train each round together as this one peer (ranks.py)."""


def checkpoint_directory(opts: DaemonOptions, peer_id: str) -> Path | None:
    """Where this peer saves: --checkpoint-dir, else (by default) DATA/checkpoints/SWARM/PEER, one folder per
    identity so that two peers of one volunteer never resume each other's state; None when switched off."""
    if opts.checkpoint_dir is not None or not opts.checkpoints_by_default:
        return opts.checkpoint_dir
    return murmur_home() / "checkpoints" / opts.join.swarm / peer_id[:16]


async def _resume_or_late_join(daemon: Daemon, directory: Path | None) -> None:
    """Continue from this peer's checkpoint; fetch a live peer's weights instead when there is none or the
    swarm has moved on by more than STALE_ROUNDS (its updates would be dropped as stale)."""
    if directory is not None:
        run_id, k = daemon.policy.run_id, daemon.member.slice
        resumed = await asyncio.to_thread(resume.restore, daemon.trainer, directory, run_id=run_id, slice_index=k)
        if resumed is not None:
            daemon.clock = resumed
            print(f"resumed from the checkpoint of round {resumed} in {directory}", flush=True)
    # what the peers that answered agree on (a lower median: one liar announcing round 2^62 is no reason)
    swarm_round = lower_median(p.round for p in daemon.eligible())
    if daemon.clock < 0 or (swarm_round is not None and swarm_round > daemon.clock + STALE_ROUNDS):
        await daemon.late_join()
    if daemon.clock >= 0:  # announce the round it goes on from now, not round 0 until the next refresh (TTL/3)
        daemon.member.round = daemon.clock
        await asyncio.to_thread(daemon.member.announce)


async def _serve(daemon: Daemon, identity: Identity, listen: tuple[str, int], gossip: GossipConfig) -> PeerServer:
    server = PeerServer(
        identity=identity, policy=daemon.policy, on_update=daemon.on_update, reply_for=daemon.reply_for,
        status=daemon.status, state_provider=lambda: daemon.snapshot, bans=daemon.bans,
        shard_lookup=daemon.trainer.fetcher.lookup if daemon.trainer.fetcher is not None else None,
        config=ServerConfig(host=listen[0], port=listen[1], exchange_timeout_s=gossip.exchange_timeout_s,
                            min_round_s=gossip.min_round_s),  # fmt: skip
    )  # fmt: skip
    await server.start()
    return server


async def _train(daemon: Daemon, opts: DaemonOptions, stop: asyncio.Event, halt: threading.Event,
                 saver: resume.Checkpointer | None) -> None:  # fmt: skip
    refresher = asyncio.create_task(refresh_until(stop, daemon.member, daemon.reporter.emit))
    admitter = asyncio.create_task(daemon.admission_loop(stop))

    def stop_if_failed(task: asyncio.Task) -> None:
        """A background loop that ended with an error (the DHT process died: DHTStopped) ends the training too;
        its error is raised below, when it is awaited, so the volunteer reads what happened."""
        if not task.cancelled() and task.exception() is not None:
            stop.set()
            halt.set()

    refresher.add_done_callback(stop_if_failed)
    admitter.add_done_callback(stop_if_failed)
    try:
        rounds = 0
        while not stop.is_set() and (opts.max_rounds == 0 or rounds < opts.max_rounds):
            if not await daemon.run_round(halt, stop):
                break
            rounds += 1
            if saver is not None:
                await asyncio.to_thread(saver.after_round, daemon.trainer, round=daemon.clock,
                                        tokens_seen=daemon.tokens_seen)  # fmt: skip
        if not stop.is_set():  # --rounds N: partners still get our last update
            await daemon.finish_exchanges(stop)
    finally:
        await daemon.drop_in_flight()
        stop.set()
        ended = await asyncio.gather(refresher, admitter, return_exceptions=True)
        await daemon.prober.close()
    for error in ended:
        if isinstance(error, BaseException):
            raise error


async def run_daemon(opts: DaemonOptions, *, software_version: str) -> None:
    """Join (peer/swarm/join.py), train until SIGTERM/SIGINT (or max_rounds), shut down in order; raises
    MurmurError on failure."""
    j = opts.join
    device = pick_device(opts.device)
    daemon: Daemon | None = None
    try:
        detail = lambda run: f", H={run.inner.steps_per_round}, device {device}"  # noqa: E731 - the run line's tail
        async with joined(j, software_version=software_version, detail=detail) as session:
            with stopping_is_no_error(session.signalled):
                daemon = await _daemon_for(session, opts, device, software_version)
                await _start(daemon, session, opts, software_version)
    except JoinInterrupted as exc:
        log.info("%s", exc)
    rounds = "none" if daemon is None else daemon.clock + 1
    log.info("left swarm %s after %s round(s)", j.swarm, rounds)


async def _daemon_for(session: Joined, opts: DaemonOptions, device: torch.device, software_version: str) -> Daemon:
    """The trainer and the daemon around it, once the manifest is in (the run's last line counts its rounds even
    when what follows ends in an error)."""
    j, identity, run, signed = opts.join, session.identity, session.run, session.signed
    try:  # a prepared dataset's index, tokenizer and held-out shard are fetched here, in a worker thread
        trainer = await asyncio.to_thread(
            Trainer, run, identity.peer_id, device, data=opts.data, micro_batch=opts.batch_size,
            grad_accum=opts.grad_accum, halt=session.halt, offload_outer=opts.offload_outer,
            checkpointing=opts.activation_checkpointing,
            peers=shard_peers(session.swarm, identity, signed.run_id, asyncio.get_running_loop(), session.halt),
        )  # fmt: skip
    except FetchStopped as exc:
        raise JoinInterrupted(str(exc)) from None
    member = Member(session.swarm, identity, signed, endpoint="", software_version=software_version)
    daemon = Daemon(trainer, member, identity, run, eval_every=opts.eval_every, overlap=opts.overlap)
    daemon.metrics.identify(PeerInfo(swarm=j.swarm, run=signed.run_id[:16], peer=identity.peer_id,
                                     version=software_version, device=str(device)))  # fmt: skip
    return daemon


async def _start(daemon: Daemon, session: Joined, opts: DaemonOptions, software_version: str) -> None:
    """Everything after the daemon is built: metrics, server, slice, resume or late join, then training; the
    checkpoint, server, status line and metrics are closed in that order whatever ends it."""
    j, identity, run, signed = opts.join, session.identity, session.run, session.signed
    trainer, member = daemon.trainer, daemon.member
    directory = checkpoint_directory(opts, identity.peer_id)
    server: PeerServer | None = None
    saver: resume.Checkpointer | None = None
    try:
        if opts.gpus > 1:  # before the swarm sees this peer: a worker that cannot start costs no announcement
            trainer.ranks = await asyncio.to_thread(Ranks.start, run, trainer.inner, trainer.device, opts.gpus,
                                                    checkpointing=opts.activation_checkpointing)  # fmt: skip
        if opts.metrics_port is not None:
            await daemon.metrics.serve(opts.metrics_host, opts.metrics_port)
            print(f"metrics at http://{opts.metrics_host}:{daemon.metrics.port}/metrics", flush=True)
        if j.listen is not None:
            server = await _serve(daemon, identity, j.listen, run.gossip)  # stopped by `finally` if what follows fails
            server = await own_endpoint(member, server, j)
        # slice, donors and partners are chosen among peers that answered at their endpoint (peer/swarm/admission.py)
        member.counted = daemon.admission.admitted
        member.peers = await asyncio.to_thread(session.swarm.live_peers, signed.run_id)
        await daemon.prober.admit_now()
        server = daemon.server = await enter(member, server, j)
        await _resume_or_late_join(daemon, directory)
        if directory is not None:
            print(f"checkpoints in {directory}, every {opts.checkpoint_every} rounds and at the end", flush=True)
            saver = resume.Checkpointer(directory=directory, every=opts.checkpoint_every,
                                        run_id=daemon.policy.run_id, peer_id=identity.peer_id,
                                        version=software_version)  # fmt: skip
        daemon.reporter.start()
        await _train(daemon, opts, session.stop, session.halt, saver)
    finally:
        if trainer.ranks is not None:
            await asyncio.to_thread(trainer.ranks.close)
        if daemon.clock >= 0 and saver is not None:
            await asyncio.to_thread(saver.save, daemon.trainer, round=daemon.clock, tokens_seen=daemon.tokens_seen)
        if server is not None:
            await server.stop()
        await daemon.reporter.aclose()
        await daemon.metrics.close()
