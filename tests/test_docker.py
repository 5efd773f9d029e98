"""The Docker images' commands, run as local processes (there is no Docker engine in CI).

The test reads ENTRYPOINT, CMD, ENV and HEALTHCHECK out of the Dockerfiles, so it runs what the images run.
The only substitutions are what `docker run` itself provides: the /data volume becomes a temporary
directory and the container's fixed port becomes an ephemeral loopback port. tests/test_docker_build.py builds
the images and runs them, where a Docker daemon answers.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peer.lab.demo import demo_toml
from peer.lab.harness import MADDR_LINE, Procs, murmur

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def instruction(dockerfile: Path, name: str) -> str:
    """The argument text of the last `name` instruction, with line continuations joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip().upper().startswith(name + " ")]
    assert lines, f"{dockerfile.name} has no {name}"
    return lines[-1][len(name) :].strip()


def base_image(dockerfile: Path) -> str:
    """The FROM image with the defaults of the ARGs declared before it (what a build without --build-arg uses)."""
    text = dockerfile.read_text()
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", text[: text.index("\nFROM ")], re.M))
    return re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], instruction(dockerfile, "FROM"))


def env(dockerfile: Path) -> dict[str, str]:
    """The image's ENV (the last ENV instruction, KEY=value pairs)."""
    return dict(pair.split("=", 1) for pair in shlex.split(instruction(dockerfile, "ENV")))


def health_check(dockerfile: Path, data: Path) -> list[str]:
    """The HEALTHCHECK command, localised."""
    health = instruction(dockerfile, "HEALTHCHECK")
    return localise(json.loads(health[health.index("CMD") + 3 :]), data)


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
    torch = re.search(r"pip install [^\n]*torch==", text)
    deps = re.search(r"pip install [^\n]* \.\s", text)  # the project's dependencies, from pyproject.toml
    assert torch and deps and torch.start() < deps.start() < first_copy_all
    assert re.search(r"^USER murmur$", text, re.M) and text.index("USER murmur") > first_copy_all
    assert "useradd --create-home --uid 10001 murmur" in text
    assert 'VOLUME ["/data"]' in text and env(DOCKER / name)["MURMUR_HOME"] == "/data"
    assert instruction(DOCKER / name, "STOPSIGNAL") == "SIGTERM"
    assert exec_form(DOCKER / name, "ENTRYPOINT")[0] == "murmur"
    # Offline builds swap the base and the wheel source through build args; the defaults are the online ones.
    assert instruction(DOCKER / name, "FROM") == "${BASE}" and re.search(r'^ARG WHEELS=""$', text, re.M)
    assert '${WHEELS:+--no-index --find-links "$WHEELS"}' in text


@pytest.mark.timeout(150)
def test_bootstrap_image_command_comes_up_healthy_and_stops_on_sigterm(procs: Procs, tmp_path: Path) -> None:
    dockerfile = DOCKER / "bootstrap.Dockerfile"
    assert base_image(dockerfile) == "python:3.11-slim"
    data = tmp_path / "data"
    data.mkdir()
    argv = localise(exec_form(dockerfile, "ENTRYPOINT") + exec_form(dockerfile, "CMD"), data)
    node = procs.start("bootstrap-image", argv)
    maddr = node.wait_for(r"^/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+$", timeout=40).group(0)
    assert (data / "addrs.txt").read_text().split()[0] == maddr and (data / "identity.key").exists()
    check = health_check(dockerfile, data)
    assert check[1:3] == ["health", "--addrs-file"]  # a DHT call, not a TCP connect
    done = subprocess.run(check, capture_output=True, text=True, timeout=40)
    assert done.returncode == 0, f"the image's HEALTHCHECK fails: {done.stdout}{done.stderr}"
    assert re.fullmatch(rf"healthy: DHT node {maddr.rsplit('/', 1)[1]} answered a ping in [\d.]+ s \(\d+ known\)\n",
                        done.stdout), done.stdout  # fmt: skip
    assert node.terminate() == 0, node.logs()
    done = subprocess.run(check, capture_output=True, text=True, timeout=40)
    assert done.returncode == 1 and done.stdout == "", done.stdout
    assert re.fullmatch(r"Error: unhealthy: .*\n", done.stderr), done.stderr  # one line


@pytest.mark.slow(27)
@pytest.mark.timeout(180)
def test_peer_image_health_check_asks_the_peers_own_dht(procs: Procs, tmp_path: Path) -> None:
    """The peer image's ENV has `murmur run` write its DHT's multiaddrs into /data, where its HEALTHCHECK reads them."""
    dockerfile = DOCKER / "peer.Dockerfile"
    data = tmp_path / "data"
    data.mkdir()
    image_env = {k: v.replace("/data", str(data)) for k, v in env(dockerfile).items() if k.startswith("MURMUR_")}
    assert image_env["MURMUR_RUN_ADDRS_FILE"] == str(data / "addrs.txt")
    (tmp_path / "run.toml").write_text(demo_toml(slices=1, preset="micro", min_round_s=0.5))
    made = procs.start("create", murmur("create-run", "--config", "run.toml", "--key", "owner.key"))
    boot = procs.start("boot", murmur("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--identity", "boot.key"))
    maddr = boot.wait_for(MADDR_LINE, timeout=60).group(1)
    assert made.wait_exit(60) == 0, made.logs()
    peer = procs.start("peer", murmur(
        "run", "--swarm", "demo", "--initial-peers", maddr, "--manifest", "manifest.json", "--key", "owner.key",
        "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--device", "cpu", "--eval-every", "0", "--no-checkpoints",
    ), env={**image_env, "OMP_NUM_THREADS": "1"})  # fmt: skip
    peer.wait_for(r"^DHT up", timeout=90)
    own = (data / "addrs.txt").read_text().split()
    assert own and all(m.startswith("/ip4/127.0.0.1/tcp/") and m not in maddr for m in own), own
    done = subprocess.run(health_check(dockerfile, data), capture_output=True, text=True, timeout=40)
    assert done.returncode == 0, f"the peer image's HEALTHCHECK fails: {done.stdout}{done.stderr}\n{peer.logs()}"
    assert done.stdout.startswith(f"healthy: DHT node {own[0].rsplit('/', 1)[1]} answered"), done.stdout
    assert peer.terminate(timeout=60) == 0, peer.logs()


@pytest.mark.timeout(60)
def test_peer_image_entrypoint_parses(tmp_path: Path) -> None:
    dockerfile = DOCKER / "peer.Dockerfile"
    assert base_image(dockerfile).startswith("nvidia/cuda:")
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


def test_health_reads_the_loopback_addresses_of_an_addrs_file_and_fails_in_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from peer.cli.health import targets
    from peer.cli.main import main

    addrs = tmp_path / "addrs.txt"
    addrs.write_text("/ip4/127.0.0.1/tcp/31337/p2p/QmA\n/ip4/172.18.0.2/tcp/31337/p2p/QmA\n")
    assert targets(addrs, ()) == ["/ip4/127.0.0.1/tcp/31337/p2p/QmA"]  # the node's own machine: its loopback
    addrs.write_text("/ip4/172.18.0.2/tcp/31337/p2p/QmA\n")
    other = "/ip4/10.0.0.1/tcp/1/p2p/QmB"
    assert targets(addrs, (other,)) == [other, "/ip4/172.18.0.2/tcp/31337/p2p/QmA"]  # no loopback line: all
    for args, code, say in (
        ([], 2, "give --addrs-file FILE or --initial-peers MADDR"),
        (["--addrs-file", str(tmp_path / "none.txt")], 1, "unhealthy: cannot read --addrs-file"),
    ):
        result = CliRunner().invoke(main, ["health", *args])
        assert result.exit_code == code and say in result.output, result.output
    addrs.write_text("")
    result = CliRunner().invoke(main, ["health", "--addrs-file", str(addrs)])
    assert result.exit_code == 1 and result.output == f"Error: unhealthy: --addrs-file {addrs} lists no multiaddr yet\n"
