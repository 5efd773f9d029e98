"""`murmur bootstrap`, `create-run` and `status`, and the membership flags of `murmur run`: the swarm commands.

Thin click commands over bootstrap/node.py, protocol/manifest.py and peer/swarm/membership.py. Heavy imports
(hivemind, torch) happen inside the commands so `murmur --help` stays fast. User errors exit 1 with a
message (ClickException); SIGTERM/SIGINT stop long-running commands cleanly with exit code 0.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click

from peer.config import RUN_METHODS
from protocol.errors import MurmurError

_MADDR_HELP = "Multiaddr of a bootstrap node or peer, e.g. /ip4/203.0.113.7/tcp/31337/p2p/QmXyz...; repeatable."


def _maddrs(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """Accept repeated flags and comma/space-separated lists (handy in env vars and compose files)."""
    return tuple(item for text in value for item in text.replace(",", " ").split())


@click.command()
@click.option("--host-maddrs", multiple=True, callback=_maddrs, default=("/ip4/0.0.0.0/tcp/31337",), show_default=True,
              help="Where to listen, e.g. /ip4/0.0.0.0/tcp/31337 (tcp/0: any free port).")  # fmt: skip
@click.option("--announce-maddrs", multiple=True, callback=_maddrs,
              help="Public addresses to advertise, e.g. /ip4/203.0.113.7/tcp/31337.")  # fmt: skip
@click.option("--initial-peers", multiple=True, callback=_maddrs, help="Other bootstrap nodes. " + _MADDR_HELP)
@click.option("--identity", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="libp2p key file; created on first start, keeps the /p2p/ id stable across restarts.")  # fmt: skip
@click.option("--initial-peers-file", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Another node's --addrs-file; read if present, re-read every minute.")  # fmt: skip
@click.option("--addrs-file", type=click.Path(dir_okay=False, path_type=Path), help="Also write the multiaddrs here.")
@click.option("--dht-start-timeout", type=click.FloatRange(1), default=60.0, show_default=True, help="Seconds.")
@click.option("--metrics-port", type=click.IntRange(0, 65535),
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port).")  # fmt: skip
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Address of the metrics server (0.0.0.0 in Docker).")  # fmt: skip
def bootstrap(host_maddrs: tuple[str, ...], announce_maddrs: tuple[str, ...], initial_peers: tuple[str, ...],
              initial_peers_file: tuple[Path, ...], identity: Path, addrs_file: Path | None,
              dht_start_timeout: float, metrics_port: int | None, metrics_host: str) -> None:  # fmt: skip
    """Run a bootstrap node: print its multiaddrs (one per line) and serve until SIGTERM.

    \b
    Example:
      murmur bootstrap --host-maddrs /ip4/0.0.0.0/tcp/31337 --identity bootstrap.key --addrs-file addrs.txt
    """
    from bootstrap.node import BootstrapConfig, run_bootstrap
    from peer import __version__
    from peer.cli.preflight import listenable_maddrs, writable_file
    from protocol.ports import check_listenable

    config = BootstrapConfig(
        identity_path=identity, host_maddrs=host_maddrs, announce_maddrs=announce_maddrs,
        initial_peers=initial_peers, initial_peers_files=initial_peers_file, addrs_file=addrs_file,
        startup_timeout_s=dht_start_timeout, metrics_host=metrics_host, metrics_port=metrics_port,
        version=__version__,
    )  # fmt: skip
    try:
        writable_file(identity, "--identity")  # before the DHT: hivemind creates the key file on first start
        if addrs_file is not None:
            writable_file(addrs_file, "--addrs-file", replaced=True)
        listenable_maddrs(host_maddrs, "--host-maddrs")
        if metrics_port:  # 0 picks a free port
            check_listenable(metrics_host, metrics_port, "--metrics-port")
        run_bootstrap(config)
    except MurmurError as exc:  # DHTStartError, SetupError
        raise click.ClickException(str(exc)) from exc


@click.command("create-run")
@click.option("--swarm", help="Swarm name volunteers type, e.g. tinystories-124m.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A TOML run config (see peer/config.py); flags given as well override it.")  # fmt: skip
@click.option("--preset", help="Model preset (tiny, small, 124m, 350m, 1.3b).")
@click.option("--slices", type=click.IntRange(1, 256), help="Parameter slices K.")
@click.option("--method", type=click.Choice(RUN_METHODS))
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Run owner's Ed25519 key (created if missing); keep it, it signs the run.")  # fmt: skip
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("manifest.json"), show_default=True
)
@click.option("--data", "data_location",
              help="A prepared dataset (murmur prepare-data): the http(s):// or file:// URL of its folder, or the "
                   "folder; volunteers fetch it from there. Its index.json is read now.")  # fmt: skip
def create_run(swarm: str | None, config_path: Path | None, preset: str | None, slices: int | None,
               method: str | None, key_path: Path, out: Path, data_location: str | None) -> None:  # fmt: skip
    """Write and sign a run manifest; print the run id and, on the last line, the run key.

    \b
    Example:
      murmur create-run --swarm tinystories-tiny --preset tiny --slices 3 --key owner.key --out manifest.json
      murmur create-run --config run.toml --data https://example.org/tinystories/ --key owner.key
    """
    from peer.cli.preflight import writable_file
    from peer.config import RunConfig, read_toml
    from peer.core.fetch import with_dataset
    from protocol import manifest as manifest_mod
    from protocol.errors import IdentityFileError, ManifestError
    from protocol.identity import Identity

    try:
        writable_file(key_path, "--key")
        writable_file(out, "--out", replaced=True)
        data = read_toml(config_path) if config_path else {}
        overrides = {"swarm": swarm, "preset": preset, "method": method}
        data.update({k: v for k, v in overrides.items() if v is not None})
        if slices is not None:
            data["slices"] = {**data.get("slices", {}), "num_slices": slices}
        if data_location is not None:
            data["data"] = {**data.get("data", {}), "location": data_location}
        config = RunConfig.from_dict(with_dataset(data))
        owner = Identity.load_or_create(key_path)
    except (ValueError, IdentityFileError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    from protocol.records import check_swarm_name

    try:
        check_swarm_name(config.swarm)
        signed = manifest_mod.sign(config.to_manifest(), owner)
    except (ValueError, ManifestError) as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        out.write_text(signed.to_json())
    except OSError as exc:
        raise click.ClickException(f"--out {out}: cannot write it ({exc.strerror or exc})") from exc
    click.echo(f"wrote {out}: swarm {config.swarm}, {config.preset}, K={config.slices.num_slices}, {config.method}")
    if config.data.prepared:
        click.echo(f"data    {config.data.dataset_id} at {config.data.location} (vocab {config.model.vocab_size})")
    click.echo(f"run id  {signed.run_id}")
    click.echo(signed.owner_key_hex)


@click.command()
@click.option("--swarm", required=True, help="Swarm name, e.g. tinystories-124m.")
@click.option("--initial-peers", multiple=True, callback=_maddrs, required=True, help=_MADDR_HELP)
@click.option("--json", "as_json", is_flag=True, help="A JSON list of live peers instead of a table.")
@click.option("--watch", is_flag=True, help="Show the table again every --every seconds, until Ctrl-C or SIGTERM.")
@click.option("--every", type=click.FloatRange(1), default=5.0, show_default=True, help="Seconds between reads.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="With --watch: each peer's loss over time, as a PNG rewritten after every read.")  # fmt: skip
@click.option("--metrics-port", type=click.IntRange(0, 65535),
              help="With --watch: serve the swarm (every live peer's announcement) as Prometheus metrics "
                   "at http://HOST:PORT/metrics (0: any free port).")  # fmt: skip
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address of the metrics server.")
@click.option("--dht-start-timeout", type=click.FloatRange(1), default=60.0, show_default=True)
@click.option("--wait", type=click.FloatRange(0), default=2.0, show_default=True,
              help="Seconds to let the DHT settle before reading.")  # fmt: skip
def status(swarm: str, initial_peers: tuple[str, ...], as_json: bool, watch: bool, every: float, plot: Path | None,
           metrics_port: int | None, metrics_host: str, dht_start_timeout: float, wait: float) -> None:  # fmt: skip
    """List the live peers of a swarm (verified announcements only): slice, round, loss, tokens/s, bytes.

    \b
    Example:
      murmur status --swarm tinystories-124m --initial-peers /ip4/203.0.113.7/tcp/31337/p2p/QmXyz... --json
      murmur status --swarm tinystories-124m --initial-peers /ip4/203.0.113.7/tcp/31337/p2p/QmXyz... \\
                    --watch --plot swarm-loss.png
    """
    import time

    from peer.cli import watch as live
    from peer.cli.preflight import writable_file
    from peer.swarm.join import swarm_view
    from protocol.ports import check_listenable
    from protocol.records import check_swarm_name

    try:
        check_swarm_name(swarm)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--swarm") from exc
    if plot is not None and not watch:
        raise click.UsageError("--plot draws the loss over time: it goes with --watch")
    if watch and as_json:
        raise click.UsageError("--watch shows a table; --json prints one reading")
    if metrics_port is not None and not watch:
        raise click.UsageError("--metrics-port serves the swarm as it is read: it goes with --watch")
    try:
        if plot is not None:
            writable_file(plot, "--plot", replaced=True)
        if metrics_port:  # before the DHT's start: a port in use is said at once (0 picks a free one)
            check_listenable(metrics_host, metrics_port, "--metrics-port")
        with swarm_view(swarm, initial_peers, timeout_s=dht_start_timeout) as view, \
                live.exported(swarm, metrics_host, metrics_port) as export:  # fmt: skip
            time.sleep(wait)
            if watch:
                live.watch(view.live_peers, swarm, every=every, plot=plot, say=click.echo, on_read=export)
                return
            peers = view.live_peers()
    except (MurmurError, ValueError) as exc:  # DHTStartError, DHTStopped, SetupError (a --plot path)
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps([p.to_json() for p in peers], indent=2))
        return
    click.echo(live.format_table(swarm, [p.to_json() for p in peers]))


def membership_options(command: Callable) -> Callable:
    """The flags of joining a swarm, shared by `join` and `run` so the two never drift apart."""
    options = [
        click.option("--swarm", required=True, help="Swarm name, e.g. tinystories-124m."),
        click.option("--initial-peers", multiple=True, callback=_maddrs, required=True, help=_MADDR_HELP),
        click.option("--run-key", help="Trust only manifests signed by this owner key (64 hex); pinned for next time."),
        click.option(
            "--manifest", "manifest_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="A manifest file to publish (the owner does this; --key proves ownership).",
        ),
        click.option(
            "--key", "owner_key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="The run owner's key, with --manifest.",
        ),
        click.option(
            "--identity", type=click.Path(dir_okay=False, path_type=Path),
            help="This peer's Ed25519 key (created if missing): who it is in the swarm; one running peer each. "
                 "[default: DATA/identity.key; DATA: $MURMUR_HOME, else ~/.local/share/murmur]",
        ),  # fmt: skip
        click.option("--listen", help="host:port of this peer's gRPC service, e.g. 0.0.0.0:7000 (port 0: any). "
                                      "[default: any port, at the address a bootstrap node sees]"),  # fmt: skip
        click.option("--announce", help="host:port others dial, when it differs from --listen (port forward)."),
        click.option("--client-only", is_flag=True,
                     help="Accept no connections; dial every exchange yourself. [default: if unreachable]"),
        click.option(
            "--host-maddrs", multiple=True, callback=_maddrs, default=("/ip4/0.0.0.0/tcp/0",), show_default=True
        ),
        click.option("--announce-ttl", type=click.FloatRange(3), default=60.0, show_default=True, help="Seconds."),
        click.option("--dht-start-timeout", type=click.FloatRange(1), default=60.0, show_default=True, help="Seconds."),
        click.option(
            "--pins", type=click.Path(dir_okay=False, path_type=Path),
            help="Pin file. [default: $MURMUR_HOME/pins.json or ~/.local/share/murmur/pins.json]",
        ),
        click.option("--addrs-file", type=click.Path(dir_okay=False, path_type=Path),
                     help="Also write this peer's DHT multiaddrs here, for `murmur health` (the Docker image sets "
                          "/data/addrs.txt)."),  # fmt: skip
    ]
    for option in reversed(options):
        command = option(command)
    return command
