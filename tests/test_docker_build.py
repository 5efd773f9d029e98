"""The Docker images really build and run (issue 18, item 3), offline: no registry, no package index.

peer/lab/docker_offline.py makes the inputs a build takes from the machine (a debootstrapped Debian base image and
a wheelhouse served on loopback) and builds both images with the Dockerfiles' build args. Then, on a user-defined
bridge network, a bootstrap container, a run owner (its manifest and key made here by `murmur create-run` and copied
into its volume) and two volunteers that join with the one line
`murmur run --swarm NAME --initial-peers MADDR --run-key KEY` (plus --device cpu and --eval-every 0, for a CPU test)
train the micro preset together; each container's /data is a named volume. The volunteers must join at their
container's address (learnt from the bootstrap node) and be found reachable there. The images' HEALTHCHECK command
runs in each container, and the bootstrap container's health (checked every 20 s here) must turn healthy. /app in
the containers must hold no .git, .venv or key (.dockerignore) and they run as uid 10001. Every container is stopped
with `docker stop` and must exit 0, and each volunteer's identity, pinned run key and checkpoints must be in its
volume, where MURMUR_HOME=/data puts them by default.

New containers are few on purpose: with a storage driver that copies (vfs, as on the machine this was written on),
each costs a copy of a 1.3 GB image to create and to remove; checks run in the running ones, and volumes are read
from the stopped ones with `docker cp`.

Skipped where no Docker daemon answers (CI). Containers, network and volumes are removed even when it fails; the
images and the build cache stay for the next run (a cached build takes seconds). A table of build seconds, image
sizes, round lines and exit codes is printed and written to REPORT.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from peer.lab import docker_offline as offline
from peer.lab.demo import demo_toml
from peer.lab.harness import murmur
from peer.node.roundline import RoundLine

pytestmark = [pytest.mark.slow(900), pytest.mark.timeout(3600)]

REPORT = Path("/tmp/docker_test_report.txt")
BOOT_IMAGE, PEER_IMAGE = "murmur-bootstrap:offline-test", "murmur-peer:offline-test"
IMAGES = {"bootstrap.Dockerfile": BOOT_IMAGE, "peer.Dockerfile": PEER_IMAGE}
RUN_TOML = demo_toml(slices=2, preset="micro", min_round_s=0.5)
SWARM = "demo"
STOP_TIMEOUT_S = 60
"""`docker stop -t`: a micro checkpoint takes well under a second; the slack is for a loaded machine."""
LABEL = "murmur.test.docker_build"
"""A label on every container, network and volume the test makes, its value the time of the run's start (Unix
seconds): a later run finds what a killed one left."""
STALE_S = 7200
"""Objects of an earlier run older than this are removed at the next start: that run was killed (its timeout is
an hour); younger ones may belong to a run going on beside this one."""
CPU_ONLY = ["-e", "OMP_NUM_THREADS=1"]
"""One OpenMP thread per peer: four containers share two cores, and spinning threads would starve the others."""


def docker(*args: str, timeout: float = 120, check: bool = True, input: bytes | None = None,
           merged: bool = False) -> str:  # fmt: skip
    """`docker args...`; its stdout (and stderr, `merged`, as `docker logs` splits a container's output), failing the
    test with both when `check` and it fails."""
    return _docker(args, timeout, check, input, merged).decode(errors="replace")


def _docker(args: tuple[str, ...], timeout: float, check: bool, input: bytes | None, merged: bool) -> bytes:
    stderr = subprocess.STDOUT if merged else subprocess.PIPE
    done = subprocess.run(["docker", *args], stdout=subprocess.PIPE, stderr=stderr, timeout=timeout, input=input)
    if check and done.returncode != 0:
        output = done.stdout + (done.stderr or b"")
        raise AssertionError(f"docker {' '.join(args)} failed ({done.returncode}):\n{output.decode(errors='replace')}")
    return done.stdout


def tar_of(files: dict[str, bytes]) -> bytes:
    """A tar of `files` (name: content) owned by the images' user (uid 10001), mode 0600: what `docker cp -` takes."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid, info.mtime = len(content), 0o600, 10001, 10001, int(time.time())
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def data_of(container: str) -> list[str]:
    """The paths in the /data volume of a (stopped) container, relative to /data (`docker cp` mounts the volume: no
    container is started to read it)."""
    stream = _docker(("cp", f"{container}:/data", "-"), 300, True, None, False)
    with tarfile.open(fileobj=io.BytesIO(stream)) as tar:
        return [name.removeprefix("data/") for name in tar.getnames() if name.startswith("data/")]


@dataclass
class Swarm:
    """The containers, network and volumes of one test, all named with one random prefix and all removed by
    `close` (what the test left running included)."""

    prefix: str = field(default_factory=lambda: f"murmur-test-{secrets.token_hex(3)}")
    label: str = field(default_factory=lambda: f"{LABEL}={int(time.time())}")
    containers: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    network: str | None = None

    def create_network(self) -> str:
        self.network = f"{self.prefix}-net"
        docker("network", "create", "--label", self.label, self.network)
        return self.network

    def volume(self, name: str) -> str:
        """The named volume of container `name`."""
        volume = f"{self.prefix}-{name}"
        if volume not in self.volumes:
            self.volumes.append(volume)
        return volume

    def start(self, name: str, image: str, args: list[str], *, options: list[str] = (),
              files: dict[str, bytes] | None = None) -> str:  # fmt: skip
        """`image` started on the network, its /data the volume `volume(name)` holding `files` (name: content, owned
        by the image's user, mode 0600) first; the container's name (the volume's too)."""
        container = f"{self.prefix}-{name}"
        self.containers.append(container)
        if self.volume(name) not in docker("volume", "ls", "-q").split():
            docker("volume", "create", "--label", self.label, self.volume(name))
        docker("create", "--name", container, "--label", self.label, "--network", str(self.network), "-v",
               f"{self.volume(name)}:/data", *options, image, *args)  # fmt: skip
        if files:
            docker("cp", "-", f"{container}:/data", input=tar_of(files))
        docker("start", container)
        return container

    def close(self) -> None:
        """Everything removed; the containers in one command (docker removes them side by side: with a storage
        driver that copies, each takes a while)."""
        if self.containers:
            docker("rm", "-f", "-v", *self.containers, check=False, timeout=600)
        if self.network is not None:
            docker("network", "rm", self.network, check=False)
        for volume in self.volumes:
            docker("volume", "rm", "-f", volume, check=False)


def logs(container: str) -> list[str]:
    return docker("logs", container, timeout=60, merged=True).splitlines()


def wait_for_line(container: str, pattern: str, timeout: float) -> re.Match[str]:
    """The first line of the container's output matching `pattern`; fails with its log tail when it exited or after
    `timeout` seconds."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        lines = logs(container)
        for line in lines:
            if match := regex.search(line):
                return match
        running = docker("inspect", "-f", "{{.State.Running}}", container).strip() == "true"
        if not running or time.monotonic() > deadline:
            why = "exited" if not running else f"not within {timeout:.0f} s"
            raise AssertionError(f"{container}: no line matching {pattern!r} ({why})\n" + "\n".join(lines[-40:]))
        time.sleep(2)


def rounds(container: str) -> list[RoundLine]:
    return [r for r in map(RoundLine.parse, logs(container)) if r is not None]


def health_command(image: str) -> list[str]:
    """The image's HEALTHCHECK command (exec form, after "CMD")."""
    test = json.loads(docker("image", "inspect", "-f", "{{json .Config.Healthcheck.Test}}", image))
    assert test[0] == "CMD", test
    return test[1:]


def build_images(report: list[str], log_dir: Path) -> None:
    """Base image and wheelhouse (made unless there), then both images built offline; their seconds and sizes."""
    took = offline.ensure_base_image()
    report.append(f"base image {offline.BASE_IMAGE:33s} " + ("cached" if took is None else f"{took:6.0f} s (made)"))
    wheels, took = offline.ensure_wheelhouse()
    report.append(f"wheelhouse {wheels.name:33s} " + ("cached" if took is None else f"{took:6.0f} s (made)"))
    with offline.serve(wheels) as url:
        for dockerfile, tag in IMAGES.items():
            took = offline.build_image(dockerfile, tag, url, log=log_dir / f"build-{dockerfile}.log")
            report.append(f"build {tag:38s} {took:6.0f} s   {offline.image_size_mb(tag):6.0f} MB")


def check_image_contents(container: str) -> None:
    """No build machine's history, environment or keys in /app (.dockerignore), and the image runs as uid 10001
    (asked of a running container: with a storage driver that copies, each new one costs a copy of the image)."""
    find = "find /app \\( -name .git -o -name .venv -o -name '*.key' -o -name '*.whl' \\) -print; id -u"
    found = docker("exec", container, "sh", "-c", find)
    assert found.split() == ["10001"], f"{container}: {found}"


def remove_stale() -> None:
    """Remove what a killed earlier run left: containers, networks and volumes whose LABEL says they were made more
    than STALE_S ago."""
    for kind, name in (("container", ".Names"), ("network", ".Name"), ("volume", ".Name")):
        listed = docker(kind, "ls", *(["-a"] if kind == "container" else []), "--filter", f"label={LABEL}",
                        "--format", f'{{{{{name}}}}} {{{{.Label "{LABEL}"}}}}')  # fmt: skip
        for line in listed.splitlines():
            found, _, made = line.partition(" ")
            if made.isdigit() and time.time() - int(made) > STALE_S:
                docker(kind, "rm", *(["-f", "-v"] if kind == "container" else []), found, check=False, timeout=300)


JANITOR = """
while kill -0 {pid} 2>/dev/null; do sleep 2; done
docker rm -f -v $(docker ps -aq --filter label={label}) >/dev/null 2>&1
docker network rm $(docker network ls -q --filter label={label}) >/dev/null 2>&1
docker volume rm -f $(docker volume ls -q --filter label={label}) >/dev/null 2>&1
"""
"""Run beside the test, in its own session: once the test's process is gone without cleaning up (a suite's `timeout`
killed it), remove this run's containers, which would otherwise train on and load the machine, and the rest."""


@pytest.fixture
def swarm() -> Iterator[Swarm]:
    reason = offline.docker_unavailable()
    if reason is not None:
        pytest.skip(f"needs a Docker daemon: {reason}")
    remove_stale()
    made = Swarm()
    script = JANITOR.format(pid=os.getpid(), label=made.label)
    janitor = subprocess.Popen(["sh", "-c", script], start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        yield made
    finally:
        made.close()
        janitor.kill()
        janitor.wait()


@dataclass
class Started:
    """The running swarm: its containers, the volunteers' peer ids and the endpoints they joined at."""

    boot: str
    owner: str
    volunteers: list[str]
    peer_ids: dict[str, str]
    endpoints: dict[str, str]


def create_run(work: Path) -> tuple[dict[str, bytes], str]:
    """The run owner's files (manifest and key), made by `murmur create-run` here, and the run key."""
    (work / "run.toml").write_text(RUN_TOML)
    made = subprocess.run(murmur("create-run", "--config", "run.toml", "--key", "owner.key", "--out", "manifest.json"),
                          cwd=work, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    return {n: (work / n).read_bytes() for n in ("manifest.json", "owner.key")}, made.stdout.strip().splitlines()[-1]


def start_swarm(swarm: Swarm, work: Path) -> Started:
    """Bootstrap node, run owner, and two volunteers that join with the one line plus what a CPU test needs; returns
    once both volunteers joined at their container's address and were found reachable."""
    swarm.create_network()
    boot = swarm.start("boot", BOOT_IMAGE, [], options=["--health-interval", "20s", "--health-start-period", "0s"])
    maddr = wait_for_line(boot, r"^/ip4/(?!127\.)[\d.]+/tcp/31337/p2p/\w+$", timeout=180).group(0)
    owner_files, run_key = create_run(work)
    owner = swarm.start("owner", PEER_IMAGE, ["--swarm", SWARM, "--initial-peers", maddr, "--manifest",
                                              "/data/manifest.json", "--key", "/data/owner.key", "--device", "cpu",
                                              "--eval-every", "0"], options=CPU_ONLY, files=owner_files)  # fmt: skip
    wait_for_line(owner, rf"^joined swarm {SWARM} ", timeout=300)
    one_line = ["--swarm", SWARM, "--initial-peers", maddr, "--run-key", run_key]
    volunteers = [swarm.start(f"peer{i}", PEER_IMAGE, [*one_line, "--device", "cpu", "--eval-every", "0"],
                              options=CPU_ONLY) for i in (1, 2)]  # fmt: skip
    peer_ids, endpoints = {}, {}
    for peer in volunteers:
        seen = wait_for_line(peer, rf"^joined swarm {SWARM} as ([0-9a-f]{{64}}) slice \d endpoint (([\d.]+):\d+)$", 300)
        assert not seen.group(3).startswith("127."), seen.group(0)  # the container's address on the network
        peer_ids[peer], endpoints[peer] = seen.group(1), seen.group(2)
        wait_for_line(peer, r"^reachability: OK", timeout=120)
    return Started(boot, owner, volunteers, peer_ids, endpoints)


def check_health(started: Started) -> dict[str, str]:
    """Each container's answer to its image's HEALTHCHECK command (all healthy), once the bootstrap container's own
    health, checked by docker, is healthy."""
    answers = {}
    for container in (started.boot, started.owner, *started.volunteers):
        image = BOOT_IMAGE if container == started.boot else PEER_IMAGE
        answers[container] = docker("exec", container, *health_command(image), timeout=90).strip().splitlines()[-1]
        assert answers[container].startswith("healthy:"), answers[container]
    deadline = time.monotonic() + 120
    while (state := docker("inspect", "-f", "{{.State.Health.Status}}", started.boot).strip()) != "healthy":
        assert time.monotonic() < deadline and state != "unhealthy", f"bootstrap container {state}"
        time.sleep(3)
    return answers


def stop(containers: list[str]) -> dict[str, tuple[float, int]]:
    """`docker stop` each (SIGTERM, then SIGKILL after STOP_TIMEOUT_S); its seconds and exit code."""
    stopped = {}
    for container in containers:
        began = time.monotonic()
        docker("stop", "-t", str(STOP_TIMEOUT_S), container, timeout=STOP_TIMEOUT_S + 60)
        code = int(docker("inspect", "-f", "{{.State.ExitCode}}", container).strip())
        stopped[container] = (time.monotonic() - began, code)
    return stopped


def volume_listing(container: str, peer_id: str) -> tuple[list[str], list[str]]:
    """What the stopped container's /data volume holds at its top, and the checkpoints in checkpoints/SWARM/PEER16."""
    paths = data_of(container)
    where = f"checkpoints/{SWARM}/{peer_id[:16]}/"
    top = {p.split("/")[0] for p in paths}
    saved = {p.removeprefix(where).split("/")[0] for p in paths if p.startswith(where + "round-")}
    return sorted(top), sorted(saved)


def test_images_build_offline_and_volunteers_train_and_checkpoint_in_containers(swarm: Swarm, tmp_path: Path) -> None:
    report = ["murmur Docker images, built offline (tests/test_docker_build.py)", ""]
    build_images(report, tmp_path)
    began = time.monotonic()
    started = start_swarm(swarm, tmp_path)
    joined_s = time.monotonic() - began
    for container in (started.boot, started.volunteers[0]):
        check_image_contents(container)
    for peer in started.volunteers:  # they train together: a round whose push-pull reached a partner
        wait_for_line(peer, r"^round \d+ .* exchanged [1-9]\d*/", timeout=600)
    report.append(f"swarm up, both volunteers joined: {joined_s:.0f} s; both exchanged: "
                  f"{time.monotonic() - began - joined_s:.0f} s later")  # fmt: skip
    health = check_health(started)
    trainers = [started.owner, *started.volunteers]
    stopped = stop([*started.volunteers, started.owner, started.boot])
    history = {c: rounds(c) for c in trainers}
    data = {p: volume_listing(p, started.peer_ids[p]) for p in started.volunteers}

    report += ["", f"{'container':26s} {'stop s':>6s} {'exit':>4s}  health check, last round lines"]
    for container, (seconds, code) in stopped.items():
        report.append(f"{container:26s} {seconds:6.1f} {code:4d}  {health[container]}")
        report += [f"{'':40s}{r.format()}" for r in history.get(container, [])[-2:]]
    for peer, (files, saved) in data.items():
        report.append(f"{peer} joined at {started.endpoints[peer]} (reachable); /data: {' '.join(files)}")
        report.append(f"  checkpoints/{SWARM}/{started.peer_ids[peer][:16]}: {' '.join(saved) or 'NONE'}")
    text = "\n".join(report)
    print("\n" + text)
    REPORT.write_text(text + "\n")

    assert all(code == 0 for _, code in stopped.values()), text
    for peer, (files, saved) in data.items():
        assert saved and {"identity.key", "pins.json"} <= set(files), text  # MURMUR_HOME=/data: all of it there
        assert any(r.exchanged >= 1 for r in history[peer]), text
