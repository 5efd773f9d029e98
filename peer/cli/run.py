"""`murmur run`: the peer daemon's command. Thin: parse flags, build DaemonOptions, run peer/node/lifecycle.py.

It takes every option of `murmur join` (same meaning) plus what training needs. Any option can also come
from `--config FILE.toml` (keys are option names, with dashes or underscores); flags and MURMUR_RUN_*
variables override the file. User errors exit 1 (ClickException) or 2 (UsageError) before the DHT
starts where they can be known then; SIGTERM/SIGINT end the loop after the current step and exit 0.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import click

from peer import __version__
from peer.cli.swarm import membership_options
from protocol.errors import MurmurError
from protocol.logs import configure_logging

NOT_IN_CONFIG = frozenset({"config", "help"})
"""Options a config file may not set."""


def _device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """auto|cpu|cuda|cuda:i, checked against the CUDA devices torch sees, before anything starts."""
    from peer.core.devices import pick_device

    try:
        pick_device(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix(f"--device {value}, but "), ctx, param) from exc
    return value


def _load_config(ctx: click.Context, param: click.Parameter, path: Path | None) -> Path | None:
    """Read FILE.toml into the command's defaults (so flags and env vars still win); eager, so it runs first."""
    if path is None:
        return None
    ctx.default_map = {**(ctx.default_map or {}), **config_defaults(ctx.command, path)}
    return path


def config_defaults(command: click.Command, path: Path) -> dict[str, Any]:
    """The options `path` sets, keyed by parameter name and type-checked; BadParameter names the bad key."""
    from peer.config import read_toml

    hint = "--config"
    try:
        data = read_toml(path)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from exc
    options = {p.name: p for p in command.params if isinstance(p, click.Option) and p.name not in NOT_IN_CONFIG}
    by_key = {opt.lstrip("-").replace("-", "_"): p for p in options.values() for opt in p.opts if opt.startswith("--")}
    values: dict[str, Any] = {}
    for key, value in data.items():
        param = by_key.get(key.replace("-", "_"))
        if param is None:
            names = [k.replace("_", "-") for k in by_key]
            close = difflib.get_close_matches(key.replace("_", "-"), names, n=1, cutoff=0.75)
            also = f" (did you mean {close[0]!r}?)" if close else ""
            raise click.BadParameter(f"{path}: unknown key {key!r}{also}", param_hint=hint)
        values[param.name] = _typed(param, key, value, path)
    return values


def _typed(param: click.Option, key: str, value: object, path: Path) -> object:
    """`value` if its TOML type suits the option (a list or string for repeatable ones, a boolean for
    switches, an integer for counts); the option's own type then checks ranges and choices at parse time."""
    if param.multiple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise click.BadParameter(f"{path}: key {key!r} takes a string or a list of strings, got {value!r}",
                                     param_hint="--config")  # fmt: skip
        return items
    kind = param.type
    if param.is_flag:
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(kind, click.types.IntParamType):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(kind, click.types.FloatParamType):
        ok, want = isinstance(value, int | float) and not isinstance(value, bool), "a number"
    else:
        ok, want = isinstance(value, str), "a string"
    if not ok:
        raise click.BadParameter(f"{path}: key {key!r} takes {want}, got {value!r}", param_hint="--config")
    try:
        return param.type_cast_value(click.Context(click.Command("config")), value)
    except click.BadParameter as exc:
        raise click.BadParameter(f"{path}: key {key!r}: {exc.message}", param_hint="--config") from exc


@click.command("run")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), is_eager=True,
              expose_value=False, callback=_load_config,
              help="A TOML file of any of these options (e.g. device = \"cuda:1\", checkpoint-every = 5); "
                   "flags override it.")  # fmt: skip
@membership_options
@click.option("--device", default="auto", show_default=True, callback=_device,
              help="auto (CUDA when there is one), cpu, cuda or cuda:INDEX.")  # fmt: skip
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to save this peer's state (on exit and every --checkpoint-every rounds). [default: "
                   "DATA/checkpoints/SWARM/PEER; DATA: $MURMUR_HOME, else ~/.local/share/murmur]")  # fmt: skip
@click.option("--no-checkpoints", is_flag=True, help="Save nothing: a crash loses this peer's work.")
@click.option("--checkpoint-every", type=click.IntRange(0), default=10, show_default=True,
              help="Also save every N rounds, so a killed peer loses at most N (0: only on exit).")  # fmt: skip
@click.option("--metrics-port", type=click.IntRange(0, 65535),
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port).")  # fmt: skip
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Address of the metrics server (0.0.0.0 in Docker).")  # fmt: skip
@click.option("--data", help="A local .txt/.jsonl file or folder, or a prepared dataset's folder (a copy of the "
                             "run's), instead of the run's data.")
@click.option("--batch-size", type=click.IntRange(1),
              help="Micro-batch (sequences per forward pass). With --grad-accum their product must be the run's "
                   "batch; alone it must divide it. [default: the run's split on CPU, fitted to free memory on "
                   "CUDA]")  # fmt: skip
@click.option("--grad-accum", type=click.IntRange(1),
              help="Micro-batches accumulated per optimiser step; alone it must divide the run's batch.")  # fmt: skip
@click.option("--rounds", "max_rounds", type=click.IntRange(0), default=0, show_default=True,
              help="Stop after this many rounds (0: until SIGTERM/Ctrl-C).")  # fmt: skip
@click.option("--eval-every", type=click.IntRange(0), default=20, show_default=True,
              help="Print the validation loss of this peer's weights every N rounds (0: never).")  # fmt: skip
@click.option("--overlap/--no-overlap", default=True, show_default=True,
              help="Train the next round while this round's exchanges finish (partners' updates are mixed a "
                   "round late; this peer's own at once); --no-overlap waits for them.")  # fmt: skip
@click.option("--offload-outer", is_flag=True,
              help="Keep the outer weights and momentum in host memory (pinned with CUDA) and take the outer step "
                   "there: the GPU holds the model, the slice's optimiser state and the codec's residuals only.")
@click.option("--activation-checkpointing", is_flag=True,
              help="Recompute each block's activations during backward instead of storing them: less GPU memory "
                   "for a larger micro-batch, one more forward pass per step.")
@click.option("--gpus", type=click.IntRange(1), default=1, show_default=True,
              help="Train as one peer on N GPUs, from --device's on (one process each, NCCL; each micro-batch split "
                   "over them), or on N CPU processes with --device cpu (gloo). One identity, one announcement.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def run(**options: object) -> None:
    """Join a swarm by name and train it: H local steps on this peer's slice, then swap updates with
    random partners, until SIGTERM or Ctrl-C (exit 0).

    The first time, give the run owner's key (--run-key); it is pinned for the next times. The identity and the
    checkpoints live in the data directory unless told otherwise; without --listen or --client-only the peer
    serves on any port at the address a bootstrap node sees, and goes client-only when that is not reachable.
    It prints each choice.

    \b
    Example:
      murmur run --swarm tinystories-124m --initial-peers /ip4/203.0.113.7/tcp/31337/p2p/QmXyz... --run-key 23ad4316...
      murmur run --swarm tinystories-124m --initial-peers /ip4/203.0.113.7/tcp/31337/p2p/QmXyz...
      murmur run --swarm tinystories-124m --initial-peers /ip4/203.0.113.7/tcp/31337/p2p/QmXyz... \\
                 --identity gpu1.key --listen 0.0.0.0:7000 --announce 198.51.100.4:7000 --device cuda:1
      murmur run --config peer.toml
    """
    from peer.cli.preflight import check_run
    from peer.node.lifecycle import DaemonOptions, run_daemon
    from peer.swarm.join import JoinOptions

    if options["log_level"]:
        configure_logging(str(options["log_level"]))
    try:
        opts = DaemonOptions(
            join=JoinOptions.from_cli(options), device=str(options["device"]),
            checkpoint_dir=options["checkpoint_dir"], checkpoints_by_default=not options["no_checkpoints"],
            checkpoint_every=int(options["checkpoint_every"]),
            metrics_port=options["metrics_port"],
            metrics_host=str(options["metrics_host"]), data=options["data"],
            batch_size=options["batch_size"], grad_accum=options["grad_accum"], max_rounds=int(options["max_rounds"]),
            eval_every=int(options["eval_every"]), overlap=bool(options["overlap"]),
            offload_outer=bool(options["offload_outer"]),
            activation_checkpointing=bool(options["activation_checkpointing"]), gpus=int(options["gpus"]),
        )  # fmt: skip
        if opts.gpus > 1:
            from peer.node.ranks import check_gpus

            check_gpus(opts.device, opts.gpus)  # SetupError, a ValueError: one line, before the DHT starts
        if options["no_checkpoints"] and options["checkpoint_dir"]:
            raise ValueError("--no-checkpoints and --checkpoint-dir contradict each other")
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    import uvloop

    try:
        check_run(opts)  # paths, ports, a --manifest file: wrong ones cost a second, not a minute of joining
        uvloop.run(run_daemon(opts, software_version=__version__))
    except (MurmurError, ValueError) as exc:  # SetupError, ManifestError, DataNotFound...: one line each
        raise click.ClickException(str(exc)) from exc
