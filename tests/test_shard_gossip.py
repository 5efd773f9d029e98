"""No single server to lose, with real processes on loopback: the run owner prepares a dataset from synthetic
English-like text (not the embedded corpus) with a 512-token BPE trained on it (`murmur prepare-data`), serves it
over HTTP (peer/lab/dataserver.py) and signs `create-run --data URL`; three peers train on it (validation loss
falls), two of them joined by swarm name alone. Part of the server's shards are corrupt at first: a peer refuses
them (SHA-256), trains those rounds on another stream, and fetches its own once they are fixed. Then the server
stops for good, and a peer that joins afterwards still trains, on index, tokenizer, held-out and train shards it
got from the other peers (FetchShard), every one verified.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from peer.core.data import stream_index_for
from peer.core.fetch import num_streams
from peer.core.shards import PreparedDataset, ShardStream
from peer.lab.dataserver import DataServer
from peer.lab.harness import MADDR_LINE, Proc, Procs, murmur, run_toml, wait_until
from protocol.identity import Identity

SEQ, H, BATCH = 64, 5, 4  # the micro preset's seq_len; run_toml's steps_per_round and batch_size below
NOUNS = ("peer round shard model river garden teacher window market letter engine story city winter signal "
         "farmer painter ocean mountain library student kitchen bridge doctor village").split()  # fmt: skip
VERBS = "finds carries watches builds follows opens answers sends trains keeps moves reads".split()
ADJECTIVES = "quiet bright small green careful distant early honest warm heavy".split()
ADVERBS = "slowly again together quickly today often carefully later".split()
EARLY = 16
"""Rounds from the start in which v1 reads the corrupt shards (the others do not)."""
EVAL = r"^eval round (\d+) val_loss ([\d.]+)"


def english_like(seed: int = 15, size: int = 300_000) -> str:
    """Deterministic sentences of a small grammar: text a BPE learns quickly, and nothing like the embedded corpus."""
    rng = random.Random(seed)
    out: list[str] = []
    length = 0
    while length < size:
        sentence = (f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the "
                    f"{rng.choice(NOUNS)} {rng.choice(ADVERBS)}.")  # fmt: skip
        if rng.random() < 0.3:
            noun, verb, other = rng.choice(NOUNS), rng.choice(VERBS), rng.choice(NOUNS)
            adjective = rng.choice(ADJECTIVES)
            sentence += f" {noun}s {verb[:-1]} when the {other} is {adjective}."
        out.append(sentence.capitalize())
        length += len(sentence) + 1
        if rng.random() < 0.1:
            out.append("\n\n")
    return " ".join(out)


def stream_of(dataset: PreparedDataset, peer_id: str) -> ShardStream:
    streams = num_streams(dataset.windows(SEQ), H * BATCH)
    return dataset.stream(SEQ, stream_index=stream_index_for(bytes.fromhex(peer_id), streams), num_streams=streams,
                          steps_per_round=H)  # fmt: skip


def corruptible(work: Path, dataset: PreparedDataset) -> tuple[dict[str, str], list[str]]:
    """Identities made before the peers start (`--identity NAME.id` loads them), so that the test knows their
    streams, and the shards to corrupt: some that v1 reads in its first rounds and the owner and v2 do not."""
    for _ in range(200):
        identities = {name: Identity.generate() for name in ("owner", "v1", "v2", "late")}
        rounds = {name: [set(stream_of(dataset, i.peer_id).shards_for_round(r, BATCH)) for r in range(EARLY)]
                  for name, i in identities.items()}  # fmt: skip
        others = set().union(*rounds["owner"], *rounds["v2"])
        corrupt = sorted(set().union(*rounds["v1"]) - others)
        hit = [bool(names & set(corrupt)) for names in rounds["v1"]]
        # v1 starts at the swarm's round, a few in: from whichever round up to EARLY / 2, it soon meets one
        if all(any(hit[start : start + EARLY // 2]) for start in range(EARLY // 2 + 1)):
            for name, identity in identities.items():
                identity.save(work / f"{name}.id")
            return {name: i.peer_id for name, i in identities.items()}, corrupt
    raise AssertionError("no identities whose first rounds read different shards")


def cache_of(work: Path, name: str, dataset: PreparedDataset) -> Path:
    return work / f"cache-{name}" / "datasets" / dataset.dataset_id


@pytest.mark.slow(50)
@pytest.mark.timeout(420)
def test_peers_serve_verified_shards_so_the_server_may_go(procs: Procs) -> None:
    work = procs.workdir
    (work / "in.txt").write_text(english_like())
    prepare = murmur("prepare-data", "--input", "in.txt", "--out", "ds", "--train-tokenizer", "512",
                     "--shard-tokens", "2000", "--heldout-fraction", "0.05")  # fmt: skip
    prepared = procs.run("prepare", prepare, timeout=120)
    assert prepared.popen.returncode == 0, prepared.logs()
    dataset = PreparedDataset.open(work / "ds")
    assert 256 < dataset.index.vocab_size <= 512 and len(dataset.index.train) >= 10, dataset.index  # the BPE merged
    ids, corrupt = corruptible(work, dataset)
    originals = {n: (work / "ds" / n).read_bytes() for n in corrupt}
    for name in corrupt:
        (work / "ds" / name).write_bytes(b"\0" * len(originals[name]))
    (work / "run.toml").write_text(run_toml("gone", preset="micro", slices=2, steps_per_round=H, batch_size=BATCH,
                                            fanout=1, min_round_s=0.5))  # fmt: skip
    server = DataServer(work / "ds")
    try:
        run_peers(procs, work, server, dataset, ids, originals)
    finally:
        server.close()


def start(procs: Procs, work: Path, name: str, maddr: str, *extra: str) -> Proc:
    """`murmur run` with its own home and cache, fetch retries shortened (the server's death counts after 2 tries)."""
    env = {"MURMUR_HOME": str(work / f"home-{name}"), "MURMUR_CACHE": str(work / f"cache-{name}"),
           "OMP_NUM_THREADS": "1", "MURMUR_FETCH_TRIES": "2", "MURMUR_FETCH_WAIT_S": "0.2"}  # fmt: skip
    return procs.start(name, murmur("run", "--swarm", "gone", "--initial-peers", maddr, "--listen", "127.0.0.1:0",
                                    "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--device", "cpu", "--no-checkpoints",
                                    "--identity", f"{name}.id", *extra), env=env)  # fmt: skip


def run_peers(procs: Procs, work: Path, server: DataServer, dataset: PreparedDataset, ids: dict[str, str],
              originals: dict[str, bytes]) -> None:  # fmt: skip
    made = procs.start("create", murmur("create-run", "--config", "run.toml", "--key", "owner.key",
                                        "--data", server.url))  # fmt: skip
    boot = procs.start("boot", murmur("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--identity", "boot.key"))
    maddr = boot.wait_for(MADDR_LINE, timeout=60).group(1)
    assert made.wait_exit(60) == 0, made.logs()
    run_key = made.lines[-1]
    # the volunteers first (they wait for the manifest), so that nobody is many rounds ahead when they join
    v1, v2 = (start(procs, work, name, maddr, "--run-key", run_key, "--eval-every", "2") for name in ("v1", "v2"))
    owner = start(procs, work, "owner", maddr, "--manifest", "manifest.json", "--key", "owner.key", "--eval-every", "0")
    owner.wait_for(r"^joined swarm gone", timeout=120)
    # v1 refuses the corrupt shards its stream reads (and trains those rounds on another stream) ...
    wait_until(lambda: "does not match its SHA-256" in stderr(v1), 180, "v1 refuses a corrupt shard", [v1])
    v1.wait_for(r"^round \d+ ", timeout=120)
    for name, data in originals.items():  # ... until the owner fixes them: then it fetches its own
        (work / "ds" / name).write_bytes(data)
    # recovery: a round after the fix trains on v1's own stream again, its shards fetched and verified
    fixed_at = len(v1.lines)
    wait_until(lambda: len(round_numbers(v1, fixed_at)) >= 2, 120, "v1 trains two rounds after the fix", [v1])
    last = round_numbers(v1, fixed_at)[-1]
    assert f"round {last} trains on stream" not in stderr(v1), stderr(v1)[-3000:]
    v1_cache, v1_stream = cache_of(work, "v1", dataset), stream_of(dataset, ids["v1"])
    assert all((v1_cache / n).read_bytes() == (work / "ds" / n).read_bytes()
               for n in v1_stream.shards_for_round(last, BATCH))  # fmt: skip
    for proc in (v1, v2):  # validation loss falls on both
        wait_until(lambda p=proc: len(evals(p)) >= 3, 180, f"{proc.name} evaluates three times", [proc])
        first, last = evals(proc)[0][1], evals(proc)[-1][1]
        assert last < first, (proc.name, evals(proc))
    server.close()  # the server is gone for good
    late = start(procs, work, "late", maddr, "--run-key", run_key, "--eval-every", "0")
    everyone = [late, owner, v1, v2]  # a failure shows all their logs (and fails at once if one of them exits)
    wait_until(lambda: any(line.startswith("joined swarm gone") for line in late.lines), 120, "late joins", everyone,
               fail_on_exit=True)
    rounds = lambda: sum(line.startswith("round ") for line in late.lines)  # noqa: E731
    wait_until(lambda: rounds() >= 2, 240, "the late peer trains two rounds", everyone, fail_on_exit=True)
    logs = stderr(late)
    assert "dataset: index.json from peer" in logs and "dataset: heldout.bin from peer" in logs, late.logs()
    assert "dataset: shard-" in logs, late.logs()
    cache = cache_of(work, "late", dataset)
    fetched = {p.name for p in cache.iterdir()}
    assert any(n.startswith("shard-") for n in fetched) and not any(n.endswith(".partial") for n in fetched)
    for name in fetched:  # every file the late peer holds is the owner's (fixed) file, byte for byte
        assert (cache / name).read_bytes() == (work / "ds" / name).read_bytes(), name
    for proc in (late, v1, v2, owner):
        assert proc.terminate(timeout=60) == 0, proc.logs()


def round_numbers(proc: Proc, start: int = 0) -> list[int]:
    """The rounds of the round lines from stdout line `start` on."""
    return [int(m[1]) for line in proc.lines[start:] if (m := re.match(r"^round (\d+) ", line))]


def evals(proc: Proc) -> list[tuple[int, float]]:
    """(round, val_loss) of each `--eval-every` line."""
    return [(int(m[1]), float(m[2])) for line in proc.lines if (m := re.match(EVAL, line))]


def stderr(proc: Proc) -> str:
    """What the process logged so far (log lines go to stderr, round lines to stdout)."""
    return proc.stderr_path.read_text(errors="replace") if proc.stderr_path.exists() else ""
