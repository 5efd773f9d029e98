"""Volunteers fetch what they train, with real processes on loopback: the run owner prepares a dataset, serves it
over HTTP (peer/lab/dataserver.py), signs `murmur create-run --data http://127.0.0.1:PORT/`, and two volunteers
that join by swarm name alone (no data flags) fetch index.json, the held-out shard and only the shards their own
streams reach into their caches, train together (round lines with an exchange) and print the eval line.
"""

from __future__ import annotations

import pytest

from peer.core.data import stream_index_for
from peer.core.fetch import num_streams
from peer.core.prepare import PrepareOptions, prepare
from peer.core.shards import PreparedDataset
from peer.lab.dataserver import served
from peer.lab.harness import MADDR_LINE, Procs, murmur, run_toml
from peer.node.roundline import parse_all

DOCS = [f"paragraph {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 5) for i in range(3000)]
"""About 300k byte tokens in 75 shards: a stream's rounds reach a few of them."""
SEQ, H, BATCH = 64, 5, 4  # the micro preset's seq_len; run_toml's steps_per_round and batch_size below


@pytest.mark.slow(10)
@pytest.mark.timeout(400)
def test_two_volunteers_fetch_the_manifests_dataset_and_train_on_it(procs: Procs) -> None:
    work = procs.workdir
    (work / "in.txt").write_text("\n\n".join(DOCS))
    prepare(PrepareOptions(inputs=(str(work / "in.txt"),), out=work / "ds", tokenizer="bytes", shard_tokens=4000,
                           heldout_fraction=0.05, progress=False))  # fmt: skip
    dataset = PreparedDataset.open(work / "ds")
    toml = run_toml("fetched", preset="micro", slices=2, steps_per_round=H, batch_size=BATCH, fanout=1, min_round_s=0.5)
    (work / "run.toml").write_text(toml)
    with served(work / "ds") as server:
        made = procs.start("create", murmur("create-run", "--config", "run.toml", "--key", "owner.key",
                                            "--data", server.url))  # fmt: skip
        boot = procs.start("boot", murmur("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--identity",
                                          "boot.key"))  # fmt: skip
        maddr = boot.wait_for(MADDR_LINE, timeout=60).group(1)
        assert made.wait_exit(60) == 0, made.logs()
        assert any(line.startswith(f"data    {dataset.dataset_id} at {server.url}") for line in made.lines)
        run_key = made.lines[-1]
        common = ("--initial-peers", maddr, "--listen", "127.0.0.1:0", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                  "--device", "cpu", "--no-checkpoints")  # fmt: skip
        owner = procs.start("owner", murmur("run", "--swarm", "fetched", *common, "--manifest", "manifest.json",
                                            "--key", "owner.key", "--identity", "owner.id", "--eval-every", "0"),
                            env={"MURMUR_HOME": str(work / "home-owner"), "MURMUR_CACHE": str(work / "cache-owner"),
                                 "OMP_NUM_THREADS": "1"})  # fmt: skip
        owner.wait_for(r"^joined swarm fetched", timeout=120)
        volunteers = []
        for name in ("v1", "v2"):
            env = {"MURMUR_HOME": str(work / f"home-{name}"), "MURMUR_CACHE": str(work / f"cache-{name}"),
                   "OMP_NUM_THREADS": "1"}  # fmt: skip
            volunteers.append(procs.start(name, murmur("run", "--swarm", "fetched", *common, "--run-key", run_key,
                                                       "--eval-every", "2"), env=env))  # fmt: skip
        peer_ids = {}
        for proc in volunteers:
            peer_ids[proc.name] = proc.wait_for(r"^joined swarm fetched as ([0-9a-f]{64}) ", timeout=180)[1]
            proc.wait_for(r"^round \d+ .* exchanged 1/1", timeout=180)
            proc.wait_for(r"^eval round \d+ val_loss [\d.]+", timeout=120)
        for proc in (*volunteers, owner):
            assert proc.terminate(timeout=60) == 0, proc.logs()
    shards = {s.name for s in dataset.index.train}
    last_of_swarm = max(r.round for proc in (*volunteers, owner) for r in parse_all(proc.lines))
    streams = num_streams(dataset.windows(SEQ), H * BATCH)
    for proc in volunteers:
        cache = work / f"cache-{proc.name}" / "datasets" / dataset.dataset_id
        fetched = {p.name for p in cache.iterdir()}
        assert {"index.json", "heldout.bin"} <= fetched and not any(n.endswith(".partial") for n in fetched)
        # what it fetched is what its own stream reached, never another stream's (that happens only when its own
        # shards cannot be had, and says so). Its rounds: those it printed, the one it was in when stopped, and the one
        # after (prefetched while that one trained). The round it was in may lie past its last line + 1: a round
        # starts one past the highest any partner claimed (peer/node/rounds.py), and a partner claims at most one
        # past its own last line; so up to the swarm's last line + 2, and + 3 for the prefetch (fresh22: a Lamport
        # jump in v2's last round fetched shards past its own last line + 2).
        assert "instead of this peer's" not in proc.stderr_path.read_text(), proc.logs()
        stream = dataset.stream(SEQ, stream_index=stream_index_for(bytes.fromhex(peer_ids[proc.name]), streams),
                                num_streams=streams, steps_per_round=H)  # fmt: skip
        reached = {name for r in range(last_of_swarm + 4) for name in stream.shards_for_round(r, BATCH)}
        assert fetched & shards and fetched & shards <= reached < shards, (proc.name, sorted(fetched))
        for file in fetched:
            assert (cache / file).read_bytes() == (work / "ds" / file).read_bytes()
