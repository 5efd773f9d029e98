"""What a command can check about its own inputs before any network starts: paths, ports, a manifest file.

Why: a mistake there should cost a second and one line naming the flag, not a minute of joining a swarm
followed by a traceback (a checkpoint folder that cannot be written used to fail at the first save). The
checks are cheap and change nothing (a probe file is created and removed at once). Passing them proves
nothing lasting (a port can be taken a moment later), so the code that really binds or writes keeps its
own error (SetupError, IdentityFileError, DataNotFound); these only move the common mistakes to the start.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from protocol.errors import ManifestError, SetupError
from protocol.manifest import PinStore, SignedRunManifest, murmur_home
from protocol.ports import check_listenable

if TYPE_CHECKING:
    from peer.node.lifecycle import DaemonOptions
    from peer.swarm.join import JoinOptions

BUILT_IN_SOURCES = ("embedded", "default")
"""A manifest's [data] source that names the corpus shipped with murmur, not a path."""
_TCP_MADDR = re.compile(r"^/(ip4|ip6)/([^/]+)/tcp/(\d+)(/|$)")


def writable_file(path: Path, flag: str, *, replaced: bool = False) -> None:
    """`path` can be created, or exists already (and, when `replaced`, can be written over)."""
    path = Path(path)
    if path.is_dir():
        raise SetupError(f"{flag} {path} is a directory, not a file")
    if path.exists():
        if replaced and not os.access(path, os.W_OK):
            raise SetupError(f"{flag} {path}: no permission to write it")
        return
    _can_write_in(path.parent, flag, path)


def usable_directory(path: Path, flag: str) -> None:
    """`path` is a folder files can be written in, or can be made into one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SetupError(f"{flag} {path} is a file, not a directory")
    _can_write_in(path, flag, path)


def existing_path(path: Path, flag: str) -> None:
    """`path` exists (a file or a folder)."""
    if not Path(path).exists():
        raise SetupError(f"{flag} {path}: no such file or directory")


def listenable_maddrs(maddrs: tuple[str, ...], flag: str) -> None:
    """Each /ip4|ip6/HOST/tcp/PORT (PORT > 0) can be listened on; others are left to the DHT, which names
    a malformed multiaddr itself."""
    for maddr in maddrs:
        match = _TCP_MADDR.match(maddr)
        if match and int(match.group(3)) > 0:
            check_listenable(match.group(2), int(match.group(3)), f"{flag} {maddr}")


def _can_write_in(directory: Path, flag: str, named: Path) -> None:
    """Create and remove one file in `directory`, or in its nearest existing ancestor when it does not exist
    yet (the command makes the missing folders; where the ancestor takes a file, it can take them)."""
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        raise SetupError(f"{flag} {named}: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".murmur-preflight-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise SetupError(f"{flag} {named}: cannot write in {existing} ({exc.strerror or exc})") from exc


def check_join(opts: JoinOptions) -> SignedRunManifest | None:
    """The membership inputs of `murmur run` (and of the tests' member); returns the checked --manifest, if given."""
    from peer.swarm.join import read_manifest_file

    writable_file(opts.identity, "--identity")
    if opts.addrs_file is not None:
        writable_file(opts.addrs_file, "--addrs-file", replaced=True)
    if opts.owner_key is None:  # a join pins the owner's key (the first seen, or --run-key)
        writable_file(PinStore(opts.pins_path).path, "--pins", replaced=True)
    if opts.listen is not None:
        check_listenable(opts.listen[0], opts.listen[1], "--listen")
    listenable_maddrs(opts.host_maddrs, "--host-maddrs")
    return read_manifest_file(opts) if opts.manifest_path is not None else None


def check_run(opts: DaemonOptions) -> None:
    """`murmur run`'s inputs: the join's, the checkpoint folder, the data (--data, or the data source of a
    --manifest file), the metrics port."""
    signed = check_join(opts.join)
    if opts.checkpoint_dir is not None:
        usable_directory(opts.checkpoint_dir, "--checkpoint-dir")
    elif opts.checkpoints_by_default:
        usable_directory(murmur_home() / "checkpoints", "--checkpoint-dir (default)")
    if opts.data is not None:
        existing_path(Path(opts.data), "--data")
    elif signed is not None:
        _check_data_source(signed, opts.join.manifest_path)
    if opts.metrics_port:  # 0 picks a free port
        check_listenable(opts.metrics_host, opts.metrics_port, "--metrics-port")


def _check_data_source(signed: SignedRunManifest, path: Path | None) -> None:
    from peer.config import RunConfig
    from peer.core.fetch import is_url, local_folder

    try:
        data = RunConfig.from_manifest(signed.manifest).data
    except ValueError as exc:
        raise ManifestError(f"--manifest {path}: not usable by this murmur ({exc})") from exc
    if data.prepared:  # a URL is fetched (and its failures retried and named) when training starts
        if not is_url(data.location) and not local_folder(data.location).is_dir():
            raise SetupError(f"--manifest {path}: its dataset {data.location} is not on this machine; give --data "
                             "FOLDER with a copy")  # fmt: skip
        return
    source = data.source
    if source not in BUILT_IN_SOURCES and not Path(source).exists():
        raise SetupError(
            f"--manifest {path}: its [data] source {source} is not on this machine; give --data PATH with a copy"
        )
