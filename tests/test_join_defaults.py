"""What `murmur run` chooses when a volunteer gives only the swarm, the initial peers and (once) the run key:
identity and checkpoints in the data directory, one running peer per identity, the address a bootstrap node
sees, client-only where none can tell, and the run key pinned (tests/test_one_line_join.py runs it for real)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from hivemind.utils.multiaddr import Multiaddr

from bootstrap.reachability import ip_of
from peer.node.lifecycle import DaemonOptions, checkpoint_directory
from peer.swarm import join as join_module
from peer.swarm.join import ANY_INTERFACE, JoinOptions, identity_lock, own_endpoint
from protocol.errors import SetupError
from protocol.identity import Identity
from protocol.manifest import PinStore, accept_owner, sign

pytestmark = pytest.mark.timeout(60)


def cli_options(**given: object) -> dict[str, object]:
    """The options click hands `JoinOptions.from_cli` for `murmur run --swarm demo --initial-peers M` + `given`."""
    options: dict[str, object] = {
        "swarm": "demo", "initial_peers": ("/ip4/127.0.0.1/tcp/1/p2p/Qm",), "identity": None, "run_key": None,
        "manifest_path": None, "owner_key": None, "listen": None, "announce": None, "client_only": False,
        "host_maddrs": ("/ip4/0.0.0.0/tcp/0",), "announce_ttl": 60.0, "dht_start_timeout": 60.0, "pins": None,
    }  # fmt: skip
    return {**options, **given}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MURMUR_HOME", str(tmp_path / "data"))
    return tmp_path / "data"


def test_the_defaults_put_the_identity_in_the_data_directory_and_find_the_address(home: Path) -> None:
    opts = JoinOptions.from_cli(cli_options())
    assert opts.identity == home / "identity.key"
    assert (opts.listen, opts.observe) == (ANY_INTERFACE, True)
    client = JoinOptions.from_cli(cli_options(client_only=True))
    assert (client.listen, client.observe) == (None, False)
    told = JoinOptions.from_cli(cli_options(listen="127.0.0.1:7000", identity=Path("mine.key")))
    assert (told.listen, told.observe, told.identity) == (("127.0.0.1", 7000), False, Path("mine.key"))


def test_checkpoints_default_to_the_data_directory_by_swarm_and_peer(home: Path) -> None:
    join = JoinOptions.from_cli(cli_options())
    peer_id = "ab" * 32
    by_default = DaemonOptions(join=join, checkpoints_by_default=True)
    assert checkpoint_directory(by_default, peer_id) == home / "checkpoints" / "demo" / ("ab" * 8)
    told = DaemonOptions(join=join, checkpoint_dir=Path("here"), checkpoints_by_default=True)
    assert checkpoint_directory(told, peer_id) == Path("here")
    assert checkpoint_directory(DaemonOptions(join=join), peer_id) is None  # --no-checkpoints, and the library


def test_one_identity_runs_one_peer_per_swarm_and_is_free_again_when_it_stops(home: Path, tmp_path: Path) -> None:
    key, copy = tmp_path / "identity.key", tmp_path / "copy.key"
    identity = Identity.generate()
    identity.save(key)
    with identity_lock(key, identity.peer_id, "demo"):
        held = rf"--identity {copy} is in use by another murmur peer in swarm demo \(pid {os.getpid()}\)"
        with pytest.raises(SetupError, match=held):  # a copy of the key is the same peer
            with identity_lock(copy, identity.peer_id, "demo"):
                pass
        with identity_lock(key, identity.peer_id, "another"):  # in another swarm it is another peer
            pass
    with identity_lock(key, identity.peer_id, "demo"):  # released on the way out (and when a process dies)
        pass
    assert sorted(p.name for p in (home / "locks").iterdir()) == [f"another-{identity.peer_id[:16]}.lock",
                                                                  f"demo-{identity.peer_id[:16]}.lock"]  # fmt: skip


class FakeServer:
    port = 5555
    stopped = False

    async def stop(self) -> None:
        self.stopped = True


SEEN = [("198.51.100.4", "198.51.100.4:5555"), ("2001:db8::7", "[2001:db8::7]:5555"), ("", "")]


@pytest.mark.parametrize(("seen", "endpoint"), SEEN)
def test_the_endpoint_is_the_address_a_bootstrap_node_sees_or_none(seen: str, endpoint: str, monkeypatch) -> None:
    async def observe_host(dht: object, initial_peers: object) -> tuple[str, str]:
        return (seen, "/ip4/203.0.113.7/tcp/31337/p2p/Qm") if seen else ("", "no node answered")

    monkeypatch.setattr(join_module, "observe_host", observe_host)
    member = SimpleNamespace(endpoint="", swarm=SimpleNamespace(dht=None))
    server = FakeServer()
    opts = JoinOptions.from_cli(cli_options(identity=Path("p.key")))
    kept = asyncio.run(own_endpoint(member, server, opts))  # type: ignore[arg-type]
    assert member.endpoint == endpoint
    assert (kept is server, server.stopped) == ((True, False) if seen else (False, True))


def test_a_connection_address_gives_its_ip_and_a_relayed_one_none() -> None:
    assert ip_of(Multiaddr("/ip4/198.51.100.4/tcp/31337")) == "198.51.100.4"
    assert ip_of(Multiaddr("/ip6/2001:db8::7/tcp/31337")) == "2001:db8::7"
    assert ip_of(Multiaddr("/dns4/example.org/tcp/31337")) == ""


def test_a_run_key_given_once_is_pinned_and_replaces_an_older_pin(tmp_path: Path) -> None:
    from peer.config import RunConfig

    owner = Identity.generate()
    signed = sign(RunConfig.from_dict({"swarm": "demo", "preset": "micro"}).to_manifest(), owner)
    pins = PinStore(tmp_path / "pins.json")
    pins.pin("demo", "cd" * 32)
    accept_owner("demo", signed, owner.public_key, pins)
    assert pins.get("demo") == signed.owner_key_hex
    accept_owner("demo", signed, None, pins)  # the next join needs no --run-key
