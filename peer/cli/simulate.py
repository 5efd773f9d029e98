"""`murmur simulate` and `murmur slices`: the simulator and the slice cost table, from the command line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import click

from peer.core.inner import InnerConfig
from peer.core.model import PRESETS
from peer.core.slices import CUTS
from peer.lab.sim import METHODS as SIM_METHODS
from protocol.codec import CODEC_NAMES as CODECS


def _methods(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    methods = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in methods if m not in SIM_METHODS]
    if unknown or not methods:
        raise click.BadParameter(f"unknown method(s) {unknown}; choose from {', '.join(SIM_METHODS)}")
    return methods


@click.command()
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True)
@click.option("--peers", type=click.IntRange(2, 256), default=8, show_default=True, help="Virtual peers N.")
@click.option("--methods", default="ddp,diloco,ppu,gossip-ppu", show_default=True, callback=_methods,
              help=f"Comma-separated, from: {', '.join(SIM_METHODS)}.")  # fmt: skip
@click.option("--slices", type=click.IntRange(1, 64), default=4, show_default=True, help="Parameter slices K.")
@click.option("--cut", type=click.Choice(CUTS), default="units", show_default=True,
              help="units: a share of every matrix per slice; blocks: consecutive block groups; "
                   "neurons: whole heads and hidden units.")  # fmt: skip
@click.option("--codec", type=click.Choice(CODECS), default="int8", show_default=True,
              help="Codec of the pseudo-gradients peers exchange (with error feedback).")  # fmt: skip
@click.option("--tokens", type=click.IntRange(1), default=None,
              help="Token budget of every method, all peers together. [default: 10 rounds]")  # fmt: skip
@click.option("--steps-per-round", "-H", type=click.IntRange(1), default=20, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True, help="Per peer and step.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=3e-3, show_default=True, help="Inner lr.")
@click.option("--rest-step", type=click.FloatRange(0, 1), default=InnerConfig().rest_step, show_default=True,
              help="Slice methods: sign step of coordinates outside the slice, x the inner lr; 0 freezes them.")
@click.option("--fanout", type=click.IntRange(1, 8), default=2, show_default=True, help="Gossip partners/round.")
@click.option("--overlap", is_flag=True,
              help="Gossip methods: a round's exchange overlaps the next round's inner steps (partners' terms a round "
                   "late).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--data", default=None, help="A .txt/.jsonl file or folder; the bundled corpus by default.")
@click.option("--sweep", is_flag=True, help="Try a grid of outer lr/momentum per method; report each at its best.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def simulate(
    preset: str, peers: int, methods: list[str], slices: int, cut: str, codec: str, tokens: int | None,
    steps_per_round: int, batch_size: int, lr: float, rest_step: float, fanout: int, overlap: bool, seed: int,
    data: str | None, sweep: bool, json_path: Path | None, plot_path: Path | None,
) -> None:  # fmt: skip
    """Compare DDP, DiLoCo, all-reduce PPU and gossip PPU with N virtual peers in one process.

    \b
    Example:
      murmur simulate --preset tiny --peers 8 --methods ddp,diloco,ppu,gossip-ppu --json out.json
    """
    import torch
    from tqdm import tqdm

    from peer.core.data import load_corpus
    from peer.core.slices import SliceConfig
    from peer.lab import compare
    from peer.lab.sim import SimConfig
    from protocol.codec import CodecConfig

    model = PRESETS[preset]
    try:
        corpus = load_corpus(data, val_fraction=0.05)
        per_round = peers * steps_per_round * batch_size * model.seq_len
        rounds = 10 if tokens is None else tokens // per_round
        if rounds < 1:
            hint = f"{tokens} tokens is less than one round ({per_round} tokens)"
            raise click.BadParameter(hint, param_hint="--tokens")
        total = rounds * steps_per_round
        inner = InnerConfig(lr=lr, rest_step=rest_step, steps_per_round=steps_per_round, batch_size=batch_size,
                            total_steps=total, warmup_steps=min(50, max(1, total // 10)))  # fmt: skip
        config = SimConfig(model=model, inner=inner, slices=SliceConfig(num_slices=slices, cut=cut),
                           codec=CodecConfig(name=codec), peers=peers, rounds=rounds, fanout=fanout,
                           overlap=overlap, seed=seed, eval_every=max(1, rounds // 5))  # fmt: skip
        _check_cut(config)
        _check_outputs(json_path, plot_path)
    except (ValueError, FileNotFoundError) as error:
        raise click.UsageError(str(error)) from error
    torch.manual_seed(seed)
    click.echo(f"simulating {', '.join(methods)}: {peers} peers, {rounds} rounds of H={steps_per_round}, "
               f"{rounds * per_round:,} tokens per method, K={slices} ({cut}), codec {codec}", err=True)  # fmt: skip
    progress = _progress_bars(tqdm, rounds)
    run = compare.sweep if sweep else compare.run_methods
    result = run(methods, corpus, config, progress)
    click.echo(compare.format_table(result))
    if json_path:
        compare.write_json(result, json_path)
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        compare.plot(result, plot_path)
        click.echo(f"wrote {plot_path}", err=True)


def _gpu_memory(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from peer.core.planner import parse_memory

    if value is None:
        return None
    try:
        return parse_memory(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from error


@click.command()
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True)
@click.option("--slices", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--cut", type=click.Choice(CUTS), default="units", show_default=True)
@click.option("--no-shared-head", is_flag=True, help="Cut the output head like every other matrix.")
@click.option("--rest-step", type=click.FloatRange(0, 1), default=InnerConfig().rest_step, show_default=True,
              help="The run's [inner] rest_step: above 0 every slice's backward costs the full model's.")
@click.option("--gpu-memory", callback=_gpu_memory, default=None, metavar="SIZE",
              help="A card's memory (24GB, 24GiB, 24G, 8000MB; binary units): whether and how a peer fits, next to "
                   "DiLoCo, and the largest preset each trains on 8, 12, 16 and 24 GB.")  # fmt: skip
@click.option("--batch", "run_batch", type=click.IntRange(1), default=InnerConfig().batch_size, show_default=True,
              help="The run's batch (sequences per optimiser step); the micro-batch divides it.")  # fmt: skip
@click.option("--micro-batch", type=click.IntRange(1), default=None,
              help="Plan for this micro-batch only. [default: the largest that fits]")  # fmt: skip
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="The run's dtype (parameters on the device).")  # fmt: skip
def slices(preset: str, slices: int, cut: str, no_shared_head: bool, rest_step: float, gpu_memory: int | None,
           run_batch: int, micro_batch: int | None, dtype: str) -> None:  # fmt: skip
    """What training each slice costs a peer, next to the full model: parameters, state, backward FLOPs;
    with --gpu-memory, whether and how it fits a card (peer/core/planner.py, predicted, not measured).

    \b
    Example:
      murmur slices --preset 124m --slices 4 --cut blocks
      murmur slices --preset 350m --slices 4 --gpu-memory 12GB
    """
    from peer.core.slices import SliceConfig, full_layout, parameter_shapes, partition, slice_cost

    config = PRESETS[preset]
    slicing = SliceConfig(num_slices=slices, cut=cut, shared_head=not no_shared_head)
    try:
        layouts = partition(config, slicing)
        if gpu_memory is None and micro_batch is not None:
            raise ValueError("--micro-batch plans a card: give --gpu-memory SIZE too")
        if micro_batch is not None and run_batch % micro_batch:
            raise ValueError(f"--micro-batch {micro_batch} must divide the run's batch of {run_batch} (--batch)")
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    full = slice_cost(config, full_layout(parameter_shapes(config)))
    click.echo(f"{'slice':<7}{'params':>14}{'grad+AdamW bytes':>18}{'bwd FLOPs/token':>17}{'params':>8}{'bwd':>7}")
    rows = [("full", full)] + [(str(k), slice_cost(config, layout, rest_moves=rest_step > 0))
                               for k, layout in enumerate(layouts)]  # fmt: skip
    for name, cost in rows:
        flops = cost.backward_flops_per_token
        click.echo(f"{name:<7}{cost.params:>14,}{cost.state_bytes:>18,}{flops:>17.3g}"
                   f"{cost.params / full.params:>8.3f}{flops / full.backward_flops_per_token:>7.3f}")  # fmt: skip
    if gpu_memory is not None:
        from peer.core.planner import report_lines

        for line in report_lines(preset, slicing, gpu_memory, run_batch=run_batch, micro_batch=micro_batch,
                                 dtype=dtype, rest_step=rest_step):  # fmt: skip
            click.echo(line)


def _check_cut(config: object) -> None:
    """Fail before training when the cut cannot split this model (e.g. K > n_layers for blocks)."""
    from peer.core.slices import partition

    partition(config.model, config.slices)


def _check_outputs(json_path: Path | None, plot_path: Path | None) -> None:
    """Before minutes of simulation, not after: the --json and --plot files can be written."""
    from peer.cli.preflight import writable_file

    for path, flag in ((json_path, "--json"), (plot_path, "--plot")):
        if path is not None:
            writable_file(path, flag, replaced=True)


def _progress_bars(tqdm: Callable, rounds: int) -> Callable[[str], Callable[[], None]]:
    """A bar per method on a terminal; a plain line per round otherwise (logs, CI)."""
    on_tty = sys.stderr.isatty()

    def start(label: str) -> Callable[[], None]:
        bar = tqdm(total=rounds, desc=f"{label:<22}", unit="round", file=sys.stderr) if on_tty else None
        done = [0]

        def tick() -> None:
            done[0] += 1
            if bar is None:
                click.echo(f"{label}: round {done[0]}/{rounds}", err=True)
                return
            bar.update(1)
            if done[0] >= rounds:
                bar.close()

        return tick

    return start
