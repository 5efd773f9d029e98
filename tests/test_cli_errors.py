"""Every wrong input to a `murmur` command: a non-zero exit, one short message naming the problem, no traceback.

Most cases fail before any network starts (peer/cli/preflight.py), so they run in-process with click's CliRunner:
there a traceback is an exception other than SystemExit, and reaching the network at all fails the test. A few
go through the real entry point as a subprocess (peer/lab/harness.py `murmur`), to show what a user sees. The binds
that the early checks cannot make safe (a port taken a moment after the check) are tested on their own.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from click.testing import CliRunner

from peer.cli.main import main
from peer.config import RunConfig
from peer.lab.harness import murmur
from peer.node.metrics import Metrics
from peer.node.trainer import Trainer
from protocol.errors import DataNotFound, IdentityFileError, SetupError
from protocol.identity import Identity
from protocol.service import PeerServer, ServerConfig
from protocol.updates import WirePolicy

MADDR = "/ip4/127.0.0.1/tcp/1/p2p/QmXyzPxZ5ZsmFQaRBQ7cfv8YzcD1VN5WNV7eGcW3cvqHZP"
RUN_KEY = "ab" * 32


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with a file where a folder is expected (`afile`); nothing may reach the network."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder\n")
    import uvloop

    def no_network(coro: object) -> None:
        getattr(coro, "close", lambda: None)()
        raise AssertionError("the command got past its checks and started the network")

    monkeypatch.setattr(uvloop, "run", no_network)
    return tmp_path


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another process (here: a plain listening socket) holds."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def fails(work: Path, args: list[str], *words: str) -> str:
    """Invoke `murmur args` in-process; assert it failed with one short message holding `words`; return it."""
    result = CliRunner().invoke(main, args, env={"MURMUR_HOME": str(work / "home"), "MURMUR_LOG_LEVEL": "WARNING"})
    assert isinstance(result.exception, SystemExit), f"not a clean exit: {result.exc_info!r}\n{result.output}"
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and len(lines) <= 4, lines  # "Error: ..." alone, or after click's usage lines
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


def run_args(*extra: str, listen: str = "127.0.0.1:0") -> list[str]:
    return ["run", "--swarm", "demo", "--initial-peers", MADDR, "--identity", "p.key", "--device", "cpu",
            "--listen", listen, *extra]  # fmt: skip


def manifest(work: Path, swarm: str = "demo", source: str | None = None) -> Path:
    """A signed manifest file for `swarm` (and its owner key, owner.key), made by `murmur create-run`."""
    config = work / f"{swarm}.toml"
    config.write_text(f'swarm = "{swarm}"\npreset = "tiny"\n' + (f'[data]\nsource = "{source}"\n' if source else ""))
    out = work / f"{swarm}-manifest.json"
    result = CliRunner().invoke(main, ["create-run", "--config", str(config), "--key", "owner.key", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


# ------------------------------------------------------------------------------------------ run and join


@pytest.mark.timeout(60)
def test_a_run_key_that_is_not_hex_is_a_usage_error(work: Path) -> None:
    fails(work, run_args("--run-key", "abc"), "--run-key", "64 hex")
    fails(work, ["join", "--swarm", "demo", "--initial-peers", MADDR, "--identity", "p.key",
                 "--listen", "127.0.0.1:0", "--run-key", "abc"], "--run-key")  # fmt: skip
    fails(work, ["eval", "--swarm", "demo", "--initial-peers", MADDR, "--run-key", "abc"], "--run-key")


@pytest.mark.timeout(60)
def test_an_identity_that_cannot_be_written_is_named(work: Path) -> None:
    fails(work, run_args("--run-key", RUN_KEY, "--identity", "afile/p.key"), "--identity afile/p.key", "afile")
    fails(work, ["join", "--swarm", "demo", "--initial-peers", MADDR, "--identity", "afile/p.key",
                 "--client-only", "--run-key", RUN_KEY], "--identity")  # fmt: skip
    fails(work, run_args("--run-key", RUN_KEY, "--identity", "."), "--identity", "is a directory")
    fails(work, ["bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--identity", "afile/boot.key"], "--identity")
    fails(work, ["create-run", "--swarm", "demo", "--key", "afile/owner.key"], "--key afile/owner.key")


@pytest.mark.timeout(30)
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_identity_in_a_read_only_folder_is_named(work: Path) -> None:
    (work / "ro").mkdir(mode=0o555)
    fails(work, run_args("--run-key", RUN_KEY, "--identity", "ro/p.key"), "--identity ro/p.key", "cannot write")


@pytest.mark.timeout(30)
def test_an_unusable_identity_file_is_reported_by_identity_itself() -> None:
    """Past the early check (a folder made read-only meanwhile, a full disk), saving still says which file."""
    with pytest.raises(IdentityFileError, match="cannot write the key there"):
        Identity.generate().save(Path("/proc/murmur-no-such-place/p.key"))


@pytest.mark.timeout(60)
def test_missing_data_is_named_before_the_network(work: Path) -> None:
    fails(work, run_args("--run-key", RUN_KEY, "--data", "missing.txt"), "--data missing.txt", "no such file")
    signed = manifest(work, source=str(work / "owners-corpus.txt"))
    fails(work, run_args("--manifest", str(signed), "--key", "owner.key"), "[data] source", "owners-corpus.txt",
          "--data")  # fmt: skip


@pytest.mark.timeout(60)
def test_a_manifests_missing_data_source_is_named_when_the_manifest_came_from_the_swarm() -> None:
    """A fetched manifest is only known after the DHT: the trainer names the source and the way out."""
    run = RunConfig.from_dict({"swarm": "demo", "preset": "tiny", "data": {"source": "/nonexistent/corpus.txt"}})
    with pytest.raises(DataNotFound, match=r"/nonexistent/corpus.txt \(the run's \[data\] source\); give --data"):
        Trainer(run, "ab" * 32, torch.device("cpu"))


@pytest.mark.timeout(60)
def test_a_checkpoint_dir_that_is_a_file_or_under_one_is_named(work: Path) -> None:
    fails(work, run_args("--run-key", RUN_KEY, "--checkpoint-dir", "afile"), "--checkpoint-dir", "is a file")
    fails(work, run_args("--run-key", RUN_KEY, "--checkpoint-dir", "afile/ckpt"), "--checkpoint-dir afile/ckpt")


@pytest.mark.timeout(60)
def test_ports_in_use_are_named_before_the_network(work: Path, taken_port: int) -> None:
    address = f"127.0.0.1:{taken_port}"
    fails(work, run_args("--run-key", RUN_KEY, listen=address), "--listen", address, "in use")
    fails(work, ["join", "--swarm", "demo", "--initial-peers", MADDR, "--identity", "p.key", "--listen", address,
                 "--run-key", RUN_KEY], "--listen", "in use")  # fmt: skip
    fails(work, run_args("--run-key", RUN_KEY, "--metrics-port", str(taken_port)), "--metrics-port", address)
    maddr = f"/ip4/127.0.0.1/tcp/{taken_port}"
    fails(work, run_args("--run-key", RUN_KEY, "--host-maddrs", maddr), "--host-maddrs", maddr, "in use")
    fails(work, ["bootstrap", "--host-maddrs", maddr, "--identity", "boot.key"], "--host-maddrs", "in use")


@pytest.mark.timeout(60)
def test_a_manifest_file_that_is_not_this_swarms_manifest_is_named(work: Path) -> None:
    (work / "garbage.json").write_bytes(b"\x00\xffnot json")
    (work / "other.json").write_text('{"format": "something else", "items": [1, 2]}')
    (work / "list.json").write_text("[1, 2, 3]")
    other_swarm = manifest(work, swarm="elsewhere")
    for path, words in [("garbage.json", ("garbage.json", "not a murmur manifest")),
                        ("other.json", ("other.json", "not a murmur manifest")),
                        ("list.json", ("list.json", "not a murmur manifest")),
                        (str(other_swarm), ("swarm 'elsewhere'", "'demo'"))]:  # fmt: skip
        fails(work, run_args("--manifest", path, "--key", "owner.key"), *words)
        fails(work, ["join", "--swarm", "demo", "--initial-peers", MADDR, "--identity", "p.key", "--client-only",
                     "--manifest", path], *words)  # fmt: skip
    signed = manifest(work)
    fails(work, run_args("--manifest", str(signed), "--key", "garbage.json"), "garbage.json", "not an Ed25519")
    Identity.generate().save(work / "stranger.key")
    fails(work, run_args("--manifest", str(signed), "--key", "stranger.key"), "--key stranger.key", "not the key")


@pytest.mark.timeout(60)
def test_other_commands_name_their_unusable_paths(work: Path) -> None:
    fails(work, ["create-run", "--swarm", "demo", "--key", "owner.key", "--out", "afile/m.json"], "--out afile/m.json")
    fails(work, ["bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--identity", "boot.key",
                 "--addrs-file", "afile/addrs"], "--addrs-file")  # fmt: skip
    fails(work, run_args("--pins", "afile/pins.json"), "--pins afile/pins.json")
    fails(work, ["status", "--swarm", "Not A Name", "--initial-peers", MADDR], "--swarm")
    fails(work, ["eval", "--checkpoint", "missing-dir"], "missing-dir")
    fails(work, ["demo", "--out", "afile/demo"], "--out afile/demo")
    fails(work, ["simulate", "--json", "afile/out.json"], "--json afile/out.json")


# ------------------------------------------------------------------------------- the real entry point


def run_murmur(work: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MURMUR_HOME": str(work / "home"), "MURMUR_LOG_LEVEL": "WARNING"}
    return subprocess.run(murmur(*args), cwd=work, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(180)
def test_the_entry_point_prints_one_line_and_starts_no_dht(tmp_path: Path, taken_port: int) -> None:
    cases = [
        (run_args("--run-key", "abc"), "--run-key"),  # a UsageError
        (run_args("--run-key", RUN_KEY, listen=f"127.0.0.1:{taken_port}"), "in use"),  # a ClickException
    ]
    for args, word in cases:
        done = run_murmur(tmp_path, *args, "--dht-start-timeout", "5")
        assert done.returncode != 0, done
        assert "Traceback" not in done.stderr + done.stdout, done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and word in errors[0], done.stderr
        assert "DHT up" not in done.stdout, done.stdout


@pytest.mark.timeout(120)
def test_a_malformed_initial_peer_is_named_by_the_dht_start(tmp_path: Path) -> None:
    """Not knowable without p2pd: the DHT start names it (protocol/dht.py), still without a traceback."""
    done = run_murmur(tmp_path, "status", "--swarm", "demo", "--initial-peers", "garbage", "--dht-start-timeout", "10")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert any(line.startswith("Error:") and "garbage" in line for line in done.stderr.splitlines()), done.stderr


# ---------------------------------------------------------------------- the binds behind the early checks


@pytest.mark.timeout(30)
def test_a_peer_server_never_shares_its_port_and_names_a_taken_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """grpc binds with SO_REUSEPORT unless told not to: a second peer on the same port used to bind silently
    and take half of the first one's connections. Taken between the check and the bind, it is a SetupError."""
    import protocol.service as service

    policy = WirePolicy(run_id="ab" * 32, expected_shapes=lambda _s: None, lookup=lambda _p: None)

    async def scenario() -> None:
        other = grpc.aio.server()  # another grpc program, with grpc's default SO_REUSEPORT
        port = other.add_insecure_port("127.0.0.1:0")
        await other.start()
        try:
            for check in (service.check_listenable, lambda *_args: None):  # with the early check, and racing it
                monkeypatch.setattr(service, "check_listenable", check)
                server = PeerServer(identity=Identity.generate(), policy=policy, on_update=_ignore,
                                    config=ServerConfig(port=port))  # fmt: skip
                with pytest.raises(SetupError, match=f"PeerService: cannot listen on 127.0.0.1:{port}"):
                    await server.start()
        finally:
            await other.stop(0)

    asyncio.run(scenario())


async def _ignore(_update: object) -> None:
    """An on_update that is never called."""


@pytest.mark.timeout(30)
def test_a_metrics_port_taken_meanwhile_is_a_setup_error(taken_port: int) -> None:
    async def scenario() -> None:
        with pytest.raises(SetupError, match=f"metrics server: cannot listen on 127.0.0.1:{taken_port}"):
            await Metrics().serve("127.0.0.1", taken_port)

    asyncio.run(scenario())
