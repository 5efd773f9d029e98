"""The `murmur` command group: every command lives in its own module beside this one and is added here.

Every option can also come from the environment as MURMUR_<COMMAND>_<OPTION> (for Docker).
"""

from __future__ import annotations

import click

from peer import __version__
from peer.cli import data, demo, export, health, run, simulate, swarm
from protocol.logs import configure_logging


@click.group(context_settings={"auto_envvar_prefix": "MURMUR", "help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="murmur")
def main() -> None:
    """murmur: train one language model with strangers' GPUs, peer to peer."""
    configure_logging()


for command in (simulate.simulate, simulate.slices, swarm.bootstrap, swarm.create_run, swarm.status, run.run,
                demo.demo, demo.evaluate, export.export, export.sample, data.prepare_data):
    main.add_command(command)
main.add_command(health.health)  # the Docker images' HEALTHCHECK
main.add_command(run.run, name="join")  # joining is training: `murmur join` is `murmur run` by another name

if __name__ == "__main__":
    main()
