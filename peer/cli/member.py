"""A swarm member that trains nothing: `python peer/cli/member.py --swarm NAME --initial-peers MADDR ...`.

It runs the one join sequence (peer/swarm/join.py: identity, DHT, verified manifest, slice, announcement,
reachability) and keeps its announcement fresh until SIGTERM, with `murmur run`'s membership flags. The tests use
it where a training peer would only cost CPU (announcement expiry, owner trust, the bootstrap node's
reachability test). It is not a `murmur` command: a volunteer who joins trains (`murmur run`; `murmur join` is
its other name); a member that announced a slice and refused every update would waste its partners' rounds.
"""

from __future__ import annotations

from pathlib import Path

import click

from peer import __version__
from peer.cli.swarm import membership_options
from protocol.errors import MurmurError

SCRIPT = str(Path(__file__).resolve())
"""What the harness runs: `[sys.executable, SCRIPT, ...]` (peer/lab/harness.py `member`)."""


@click.command()
@membership_options
def member(**options: object) -> None:
    """Join a swarm by name: verify its manifest, pick a slice, announce and refresh until SIGTERM (no training)."""
    from peer.cli.preflight import check_join
    from peer.swarm.join import JoinOptions, run_join

    try:
        opts = JoinOptions.from_cli(options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    import uvloop

    try:
        check_join(opts)  # paths, the port, a --manifest file, before the DHT starts
        uvloop.run(run_join(opts, software_version=__version__))
    except (MurmurError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":
    from protocol.logs import configure_logging

    configure_logging()
    member(auto_envvar_prefix="MURMUR_MEMBER")
