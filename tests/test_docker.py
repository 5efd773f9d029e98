"""The Docker images' commands, run as local processes (there is no Docker engine in CI).

The test reads ENTRYPOINT, CMD and HEALTHCHECK out of the Dockerfiles, so it runs what the images run.
The only substitutions are what `docker run` itself provides: the /data volume becomes a temporary
directory and the container's fixed port becomes an ephemeral loopback port.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peer.lab.harness import Procs, murmur

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def instruction(dockerfile: Path, name: str) -> str:
    """The argument text of the last `name` instruction, with line continuations joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip().upper().startswith(name + " ")]
    assert lines, f"{dockerfile.name} has no {name}"
    return lines[-1][len(name) :].strip()


def exec_form(dockerfile: Path, name: str) -> list[str]:
    """An instruction in JSON exec form (the only form we allow: no shell between signals and murmur)."""
    return json.loads(instruction(dockerfile, name))


def localise(argv: list[str], data: Path) -> list[str]:
    out = []
    for arg in argv:
        arg = arg.replace("/data/", f"{data}/").replace("/ip4/0.0.0.0/tcp/31337", "/ip4/127.0.0.1/tcp/0")
        out.append(arg)
    if out and out[0] == "murmur":
        out[0] = murmur()[0]
    if out and out[0] == "python":
        out[0] = sys.executable
    return out


@pytest.mark.parametrize("name", ["bootstrap.Dockerfile", "peer.Dockerfile"])
def test_dockerfiles_cache_dependencies_and_drop_root(name: str) -> None:
    text = (DOCKER / name).read_text()
    first_copy_all = text.index("COPY . .")
    assert text.index("pip install torch==") < first_copy_all and text.index("pip install .") < first_copy_all
    assert re.search(r"^USER murmur$", text, re.M) and text.index("USER murmur") > first_copy_all
    assert 'VOLUME ["/data"]' in text


@pytest.mark.timeout(60)
def test_bootstrap_image_command_comes_up_healthy_and_stops_on_sigterm(procs: Procs, tmp_path: Path) -> None:
    dockerfile = DOCKER / "bootstrap.Dockerfile"
    assert "python:3.11-slim" in instruction(dockerfile, "FROM")
    data = tmp_path / "data"
    data.mkdir()
    argv = localise(exec_form(dockerfile, "ENTRYPOINT") + exec_form(dockerfile, "CMD"), data)
    node = procs.start("bootstrap-image", argv)
    maddr = node.wait_for(r"^/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+$", timeout=40).group(0)
    assert (data / "addrs.txt").read_text().split()[0] == maddr and (data / "identity.key").exists()
    health = instruction(dockerfile, "HEALTHCHECK")
    check = localise(json.loads(health[health.index("CMD") + 3 :]), data)
    assert subprocess.run(check, timeout=20).returncode == 0, "the image's HEALTHCHECK fails"
    assert node.terminate() == 0, node.logs()


@pytest.mark.timeout(60)
def test_peer_image_entrypoint_parses(tmp_path: Path) -> None:
    dockerfile = DOCKER / "peer.Dockerfile"
    assert instruction(dockerfile, "FROM").startswith("nvidia/cuda:")
    argv = localise(exec_form(dockerfile, "ENTRYPOINT") + exec_form(dockerfile, "CMD"), tmp_path)
    assert argv[1:] == ["run", "--help"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if "No such command 'run'" in result.stderr:
        assert subprocess.run(argv[:1] + ["--help"], capture_output=True, timeout=60).returncode == 0
        pytest.xfail("`murmur run` (the peer daemon) is a later issue; the entry point itself resolves")
    assert result.returncode == 0, result.stderr


def test_compose_starts_two_bootstrap_nodes_that_list_each_other() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    boot1, boot2 = compose["services"]["boot1"], compose["services"]["boot2"]
    for me, other in ((boot1, "boot2"), (boot2, "boot1")):
        assert me["build"]["dockerfile"] == "docker/bootstrap.Dockerfile"
        assert f"--initial-peers-file=/addrs/{other}.txt" in me["command"]
        assert any(v.endswith(":/data") for v in me["volumes"]) and "addrs:/addrs" in me["volumes"]
    assert boot2["depends_on"]["boot1"]["condition"] == "service_healthy"
    # Each command parses with the real CLI (click validates every option without starting anything).
    from click.testing import CliRunner

    from peer.cli.main import main

    for service in (boot1, boot2):
        result = CliRunner().invoke(main, ["bootstrap", *service["command"], "--help"])
        assert result.exit_code == 0, result.output
