"""Build murmur's Docker images with no registry and no package index: what tests/test_docker_build.py runs.

The Dockerfiles (docker/) default to what a user online has: `python:3.11-slim` or the CUDA base from a registry,
torch and the rest from the package indexes. Their build args swap both sources, and this module makes the local
ones:

- the base image: a minimal Debian bookworm (its python3 is 3.11, as the wheels are) with python3, python3-venv and
  ca-certificates, made by `debootstrap` from the apt mirror and loaded with `docker import` as BASE_IMAGE;
- the wheelhouse: `pip wheel` of torch's CPU build and every dependency in pyproject.toml (sdists built here, so
  the image builds nothing), kept in a cache folder outside the repository (`cache_dir`). pip looks where it is
  configured to (here: the machine's own wheels and index); elsewhere the +cpu torch needs
  PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu;
- during the build, the wheelhouse served over HTTP on loopback, and `docker build --network host` with
  `--build-arg WHEELS=<that URL>`: the wheels reach pip without entering the build context or any layer, with the
  legacy builder and BuildKit alike (a `RUN --mount` of the wheelhouse needs BuildKit, which a docker CLI without
  buildx cannot use; a COPY of it would put it in a layer). The URL keeps one port (WHEELS_PORT) so that the build
  cache, which keys on build args, hits next time.

Both preparations are skipped when their result exists. `python -m peer.lab.docker_offline [--build]` prepares
them (and builds both images) and prints the seconds of each step.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = "murmur-base:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
TORCH = "torch==2.13.0+cpu"
"""The +cpu local version can only be the CPU build: a bare torch==2.13.0 from PyPI is the CUDA one (GBs)."""
WHEELS_PORT = 47613
"""The wheelhouse's port when free: a stable WHEELS build arg keeps docker's build cache (any free one otherwise)."""
TRIMMED = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale",
           "usr/share/info")  # fmt: skip
"""What the base needs not carry: downloaded .debs, package lists, documentation and translations (275 -> 133 MB)."""


class OfflineError(RuntimeError):
    """A step of the offline build failed; the message names the step and quotes its output."""


def cache_dir() -> Path:
    """Where the wheelhouse lives between runs: $MURMUR_DOCKER_CACHE, else ~/.cache/murmur/docker-offline."""
    if os.environ.get("MURMUR_DOCKER_CACHE"):
        return Path(os.environ["MURMUR_DOCKER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "murmur" / "docker-offline"


def docker_unavailable() -> str | None:
    """Why no Docker daemon can be used here (None: `docker info` answers)."""
    if shutil.which("docker") is None:
        return "no docker command on PATH"
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        return f"no Docker daemon answers `docker info` ({said[-1] if said else f'exit {done.returncode}'})"
    return None


def _run(argv: list[str], what: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise OfflineError(f"{what} failed ({done.returncode}): {' '.join(argv)}\n{tail}")
    return done


def ensure_base_image(tag: str = BASE_IMAGE) -> float | None:
    """Make `tag` from a debootstrapped bookworm unless docker has it; the seconds it took (None: it was there)."""
    if image_id(tag) is not None:
        return None
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        raise OfflineError(f"{tag} is missing and making it needs debootstrap and root; or load any image with "
                           f"python3 (3.11) and python3-venv as {tag}")  # fmt: skip
    began = time.monotonic()
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir=cache_dir()) as tmp:  # on the disk that has the room
        rootfs = Path(tmp) / "rootfs"
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm", str(rootfs),
              DEBIAN_MIRROR], "debootstrap", timeout=1800)  # fmt: skip
        for path in TRIMMED:
            for child in (rootfs / path).glob("*"):
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        for stale in (rootfs / "var/cache/apt").glob("*.bin"):
            stale.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            _run(["docker", "import", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["bash"]', "-", tag],
                 "docker import", stdin=tar.stdout, timeout=600)  # fmt: skip
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()
    return time.monotonic() - began


def requirements() -> list[str]:
    """What the wheelhouse holds: torch's CPU build, pyproject.toml's dependencies and its build requirements
    (`pip install .` in the image builds murmur in an isolated environment that wants setuptools)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [TORCH, *project["project"]["dependencies"], *project["build-system"]["requires"], "wheel"]


def ensure_wheelhouse(directory: Path | None = None) -> tuple[Path, float | None]:
    """The wheelhouse (made by `pip wheel` unless one for these requirements exists) and the seconds it took.

    The folder is named by a hash of the requirements, so a changed pyproject.toml makes a new one; it is made
    beside its final name and renamed, so an interrupted run leaves no half wheelhouse that looks whole."""
    wanted = requirements()
    digest = hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:12]
    directory = directory or cache_dir() / f"wheels-{digest}"
    if (directory / "requirements.txt").is_file():
        return directory, None
    began = time.monotonic()
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(partial), *wanted], "pip wheel",
         timeout=3600)  # fmt: skip
    if any(p.name.startswith("nvidia_") for p in partial.glob("*.whl")):
        raise OfflineError(f"pip picked CUDA wheels for {partial}: torch must be the +cpu build")
    (partial / "requirements.txt").write_text("\n".join(wanted) + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)
    return directory, time.monotonic() - began


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve(directory: Path, port: int = WHEELS_PORT) -> Iterator[str]:
    """`directory` over HTTP on 127.0.0.1 (pip's --find-links reads the listing) until the block ends; its URL.
    On WHEELS_PORT when free (a stable build arg: the build cache hits), else on any free port."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="wheelhouse", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def build_image(dockerfile: str, tag: str, wheels_url: str, *, base: str = BASE_IMAGE, log: Path | None = None,
                timeout: float = 3600) -> float:  # fmt: skip
    """`docker build` of docker/<dockerfile> as `tag` from `base` and the wheelhouse at `wheels_url`; seconds.

    The image `tag` named before is removed when the build replaced it (and no container uses it): with a storage
    driver that copies, each stale one holds gigabytes."""
    argv = ["docker", "build", "--network", "host", "-f", str(ROOT / "docker" / dockerfile), "-t", tag,
            "--build-arg", f"BASE={base}", "--build-arg", f"WHEELS={wheels_url}", str(ROOT)]  # fmt: skip
    before = image_id(tag)
    began = time.monotonic()
    done = _run(argv, f"building {tag}", timeout=timeout)
    took = time.monotonic() - began
    if log is not None:
        log.write_text(done.stdout + done.stderr)
    if before is not None and before != image_id(tag):
        subprocess.run(["docker", "image", "rm", before], capture_output=True)  # refused while in use: fine
    return took


def image_id(tag: str) -> str | None:
    done = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", tag], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def image_size_mb(tag: str) -> float:
    size = _run(["docker", "image", "inspect", "-f", "{{.Size}}", tag], "docker image inspect").stdout
    return int(size.strip()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="store_true", help="also build murmur-bootstrap and murmur-peer")
    args = parser.parse_args()
    took = ensure_base_image()
    print(f"base image {BASE_IMAGE}: " + ("there already" if took is None else f"made in {took:.0f} s"), flush=True)
    wheels, took = ensure_wheelhouse()
    print(f"wheelhouse {wheels}: " + ("there already" if took is None else f"made in {took:.0f} s"), flush=True)
    if args.build:
        with serve(wheels) as url:
            for dockerfile, tag in (("bootstrap.Dockerfile", "murmur-bootstrap"), ("peer.Dockerfile", "murmur-peer")):
                took = build_image(dockerfile, tag, url)
                print(f"{tag}: built in {took:.0f} s, {image_size_mb(tag):.0f} MB", flush=True)


if __name__ == "__main__":
    main()
