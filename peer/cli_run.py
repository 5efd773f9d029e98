"""`murmur run`: the peer daemon's command. Thin: parse flags, build DaemonOptions, run peer/daemon.py.

It takes every option of `murmur join` (same meaning) plus what training needs. User errors exit 1
(ClickException) or 2 (UsageError); SIGTERM/SIGINT end the loop after the current step and exit 0.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from peer import __version__
from peer.cli_swarm import membership_options
from protocol.errors import MurmurError


@click.command("run")
@membership_options
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to save this peer's state (on exit and every --checkpoint-every rounds).")  # fmt: skip
@click.option("--checkpoint-every", type=click.IntRange(0), default=10, show_default=True,
              help="Also save every N rounds, so a killed peer loses at most N (0: only on exit).")  # fmt: skip
@click.option("--metrics-port", type=click.IntRange(0, 65535),
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port).")  # fmt: skip
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Address of the metrics server (0.0.0.0 in Docker).")  # fmt: skip
@click.option("--data", help="A local .txt/.jsonl file or folder instead of the run's corpus.")
@click.option("--batch-size", type=click.IntRange(1),
              help="Micro-batch; must divide the run's batch (the rest is gradient accumulation).")  # fmt: skip
@click.option("--rounds", "max_rounds", type=click.IntRange(0), default=0, show_default=True,
              help="Stop after this many rounds (0: until SIGTERM/Ctrl-C).")  # fmt: skip
@click.option("--eval-every", type=click.IntRange(0), default=20, show_default=True,
              help="Print the validation loss of this peer's weights every N rounds (0: never).")  # fmt: skip
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def run(**options: object) -> None:
    """Join a swarm by name and train it: H local steps on this peer's slice, then swap updates with
    random partners, until SIGTERM or Ctrl-C (exit 0).

    \b
    Example:
      murmur run --swarm tinystories-124m --initial-peers /ip4/203.0.113.7/tcp/31337/p2p/QmXyz... \\
                 --run-key 23ad4316... --identity peer.key --listen 0.0.0.0:7000 --announce 198.51.100.4:7000
    """
    from peer.daemon import DaemonOptions, run_daemon
    from peer.swarm_join import JoinOptions

    if options["log_level"]:
        logging.getLogger("murmur").setLevel(str(options["log_level"]).upper())
    try:
        opts = DaemonOptions(
            join=JoinOptions.from_cli(options), device=str(options["device"]),
            checkpoint_dir=options["checkpoint_dir"], checkpoint_every=int(options["checkpoint_every"]),
            metrics_port=options["metrics_port"],
            metrics_host=str(options["metrics_host"]), data=options["data"],
            batch_size=options["batch_size"], max_rounds=int(options["max_rounds"]),
            eval_every=int(options["eval_every"]),
        )  # fmt: skip
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    import uvloop

    try:
        uvloop.run(run_daemon(opts, software_version=__version__))
    except (MurmurError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
