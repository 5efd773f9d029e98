"""A swarm of 32 DHT nodes on loopback (issue 17, item 3): every peer finds all its possible partners, and the
connections one peer holds do not grow with the swarm.

One bootstrap node, the owner and light members (peer/lab/scale.py: the whole join sequence, announcements and their
refreshes every 20 s, reachability, probes; no training), 31 peers: 32 DHT nodes with the bootstrap
node. Before protocol/dht_connections.py each peer held a libp2p connection to every other: 8, 16-18 and 33-36 at
8, 16 and 32 peers (benchmarks/README.md). Now lookups contact BUCKET_SIZE nodes and connections idle IDLE_S beyond
MAX_CONNECTIONS are closed, so the typical peer (the median) holds at most about MAX_CONNECTIONS whatever the size.
The few nodes nearest the announcement key are asked by every peer at every refresh and hold more (printed, not
bounded here). Client-only members would cost the suite less CPU, but a swarm of them admits nobody (no endpoint to
probe), so every member re-bootstraps at each refresh for want of peers and holds twice as many connections.
"""

from __future__ import annotations

import statistics

import pytest

from peer.lab.harness import Procs
from peer.lab.scale import GrowingSwarm
from protocol.dht_connections import IDLE_S, MAX_CONNECTIONS, TRIM_EVERY_S

PEERS = 31
"""With the bootstrap node, 32 DHT nodes; before the bound each peer held a connection to about 30 of them."""
TTL_S = 60.0
"""The default announcement TTL: a refresh every 20 s, so a refresh's connections go idle and are closed before the
next (at a 5 s refresh they never idle 4 s, and what a peer holds is whatever its last few lookups touched)."""
SEE_ALL_BOUND_S = 240.0
"""How long a newcomer may take to list every peer: a dozen 20 s refreshes, with the start of 31 processes on a
loaded 2-core machine; what it measures is that discovery ends, not how fast."""
SETTLE_S = IDLE_S + 2 * TRIM_EVERY_S
"""Time before counting: a connection idle IDLE_S is closed by the next trim or two."""


@pytest.mark.slow(125)
@pytest.mark.timeout(600)
def test_31_peers_find_each_other_and_each_holds_a_bounded_number_of_connections(procs: Procs) -> None:
    swarm = GrowingSwarm(procs, ttl_s=TTL_S)
    r = swarm.grow_to(PEERS, timeout_s=SEE_ALL_BOUND_S, settle_s=SETTLE_S)
    totals = sorted(a + b for a, b in zip(r.libp2p, r.grpc, strict=True))
    print(f"\n{r.peers} peers: newcomers saw everyone in {min(r.see_all_s):.1f}-{max(r.see_all_s):.1f} s; "
          f"connections per peer {totals} (gRPC: {sorted(r.grpc)[-3:]} at most)")  # fmt: skip
    assert len(r.see_all_s) == PEERS - 1 and max(r.see_all_s) < SEE_ALL_BOUND_S
    # The typical peer holds at most about MAX_CONNECTIONS libp2p connections (a few more between two trims), and a
    # gRPC connection only while a probe or an exchange runs: far below the 30 it held without the bound.
    assert statistics.median(totals) <= MAX_CONNECTIONS + 4, totals
