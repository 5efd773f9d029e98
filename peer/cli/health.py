"""`murmur health`: does the DHT node at this address answer? One line, exit 0 (yes) or 1 (no): the images' HEALTHCHECK.

Why a DHT call and not a TCP connect: a port can accept while the node behind it is wedged (p2pd up, the DHT process
hung or gone, the event loop stuck). The check starts a client-mode DHT node of its own on loopback (a fresh libp2p
identity; it announces, stores and serves nothing), dials the node through its `--initial-peers` and sends it a DHT
ping (hivemind's `rpc_ping`), which only the node's DHT protocol answers, with its DHT id. A failed attempt is
repeated while the budget allows (a loaded machine can miss one dial); bounded by `--timeout` in all: a hard exit
ends a check that hangs (its DHT process and p2pd die with it, protocol/dht.py).

Cost: importing hivemind (and torch) and one p2pd, about 2 CPU-seconds; the images check once a minute.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from functools import partial
from pathlib import Path

import click

from peer.cli.swarm import _maddrs
from protocol.errors import MurmurError

LOOPBACK = ("/ip4/127.0.0.1/", "/ip6/::1/")
ATTEMPTS = 3
MIN_ATTEMPT_S = 5.0
"""Another attempt (of at most ATTEMPTS) is made while this much of the budget is left."""


def targets(addrs_file: Path | None, initial_peers: tuple[str, ...]) -> list[str]:
    """The multiaddrs to check: `initial_peers` as given, plus those of `addrs_file` (what `murmur bootstrap` and
    `murmur run` write there), of which only the loopback ones when it has any: a file read on the node's own
    machine names the node, and its other addresses may not be reachable from here (a container's, a NAT's)."""
    found = list(initial_peers)
    if addrs_file is not None:
        try:
            listed = [line.strip() for line in addrs_file.read_text().splitlines() if "/p2p/" in line]
        except OSError as exc:
            why = exc.strerror or exc
            raise click.ClickException(f"unhealthy: cannot read --addrs-file {addrs_file} ({why})") from exc
        if not listed:
            raise click.ClickException(f"unhealthy: --addrs-file {addrs_file} lists no multiaddr yet")
        local = [m for m in listed if m.startswith(LOOPBACK)]
        found += local or listed
    return list(dict.fromkeys(found))


async def _ping_all(_dht: object, node: object, peer_ids: list[str]) -> tuple[str, int] | None:
    """Inside the DHT process: the first of `peer_ids` whose DHT answers a ping (its peer id, our routing table's
    size), or None when none does."""
    from hivemind.p2p import PeerID

    for text in peer_ids:
        if await node.protocol.call_ping(PeerID.from_base58(text)) is not None:  # type: ignore[attr-defined]
            return text, len(node.protocol.routing_table.uid_to_peer_id)  # type: ignore[attr-defined]
    return None


class Unhealthy(Exception):
    """One attempt found no DHT node answering; the message says what failed."""


def attempt(maddrs: list[str], timeout_s: float) -> tuple[str, int]:
    """One check: a client-mode DHT started against `maddrs`, a ping to each; (the peer id that answered, our routing
    table's size), or Unhealthy."""
    from protocol.dht import start_dht

    try:
        dht = start_dht(initial_peers=maddrs, host_maddrs=("/ip4/127.0.0.1/tcp/0",), startup_timeout_s=timeout_s,
                        client_mode=True)  # fmt: skip
    except MurmurError as exc:  # DHTStartError: p2pd could not reach any of them
        raise Unhealthy(str(exc).splitlines()[0]) from exc
    try:
        peer_ids = list(dict.fromkeys(m.rsplit("/p2p/", 1)[-1] for m in maddrs))
        answered = dht.run_coroutine(partial(_ping_all, peer_ids=peer_ids))
    except MurmurError as exc:  # DHTStopped
        raise Unhealthy(str(exc)) from exc
    finally:
        dht.shutdown()
    if answered is None:
        raise Unhealthy(f"no DHT node answered a ping at {' '.join(maddrs)}")
    return answered


def check(maddrs: list[str], budget_s: float) -> str:
    """Attempts until one finds the node, ATTEMPTS failed or `budget_s` is spent (a node on a loaded machine may miss
    one dial); the line to print when it answers, ClickException (exit 1) with the last failure otherwise."""
    began = time.monotonic()
    tries = 0
    while True:
        tries += 1
        left = budget_s - (time.monotonic() - began)
        try:
            peer_id, known = attempt(maddrs, max(left, MIN_ATTEMPT_S))
        except Unhealthy as exc:
            if tries == ATTEMPTS or budget_s - (time.monotonic() - began) < MIN_ATTEMPT_S:
                took = time.monotonic() - began
                raise click.ClickException(f"unhealthy: {exc} ({tries} attempt(s) in {took:.0f} s)") from exc
            time.sleep(1.0)
            continue
        took = time.monotonic() - began
        return f"healthy: DHT node {peer_id} answered a ping in {took:.1f} s ({known} known)"


def _hard_deadline(timeout_s: float) -> threading.Timer:
    """A timer that ends the process with exit 1 after `timeout_s`, whatever it waits on then."""

    def give_up() -> None:
        print(f"Error: unhealthy: no answer within {timeout_s:.0f} s", file=sys.stderr, flush=True)
        os._exit(1)

    timer = threading.Timer(timeout_s, give_up)
    timer.daemon = True
    timer.start()
    return timer


@click.command()
@click.option("--addrs-file", type=click.Path(dir_okay=False, path_type=Path),
              help="The node's multiaddrs file (the --addrs-file of `murmur bootstrap` or `murmur run`).")  # fmt: skip
@click.option("--initial-peers", multiple=True, callback=_maddrs,
              help="A DHT node to check, e.g. /ip4/127.0.0.1/tcp/31337/p2p/QmXyz...; repeatable.")  # fmt: skip
@click.option("--timeout", "timeout_s", type=click.FloatRange(2), default=25.0, show_default=True,
              help="Seconds for the whole check.")  # fmt: skip
def health(addrs_file: Path | None, initial_peers: tuple[str, ...], timeout_s: float) -> None:
    """Check that a DHT node answers (a DHT ping from a throw-away client node): print one line, exit 0 or 1.

    \b
    Example:
      murmur health --addrs-file /data/addrs.txt
      murmur health --initial-peers /ip4/127.0.0.1/tcp/31337/p2p/QmXyz...
    """
    maddrs = targets(addrs_file, initial_peers)
    if not maddrs:
        raise click.UsageError("give --addrs-file FILE or --initial-peers MADDR")
    # Only the verdict is the check's output: hivemind's warnings about a node that does not answer repeat it.
    logging.getLogger("hivemind").setLevel(logging.CRITICAL)
    deadline = _hard_deadline(timeout_s)
    try:
        click.echo(check(maddrs, timeout_s * 0.7))  # the rest: shutting the last attempt's DHT down
    finally:
        deadline.cancel()
