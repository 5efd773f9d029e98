"""`murmur prepare-data`: a thin click command over peer/core/prepare.py.

Stdout ends with the dataset id alone on its line (the SHA-256 of index.json, what a run config names), so a
script takes `tail -n 1`; progress bars and warnings go to stderr. User errors exit 1 with one line.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("prepare-data")
@click.option("--input", "inputs", multiple=True, required=True, metavar="PATH",
              help="A .txt, .jsonl (.gz, .zst) or .parquet file, a directory of them, or hf:NAME[:CONFIG][@SPLIT] "
                   "from the local Hugging Face cache. Repeat for more; read in the order given.")  # fmt: skip
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The dataset folder to create (must not exist, or be empty).")  # fmt: skip
@click.option("--tokenizer", metavar="FILE|bytes",
              help="An existing Hugging Face tokenizer.json, or 'bytes' (vocab 256, no file).")  # fmt: skip
@click.option("--train-tokenizer", "train_vocab", type=click.IntRange(257, 1 << 32), metavar="VOCAB",
              help="Train a byte-level BPE of VOCAB tokens on the inputs instead.")  # fmt: skip
@click.option("--text-field", default="text", show_default=True, help="The jsonl field or parquet column of the text.")
@click.option("--shard-tokens", type=click.IntRange(1), default=1 << 24, show_default=True,
              help="Tokens per training shard (the last one is shorter).")  # fmt: skip
@click.option("--heldout-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.01,
              show_default=True, help="Every (1/f)-th document goes to the held-out shard...")  # fmt: skip
@click.option("--heldout-tokens", type=click.IntRange(1), default=1 << 22, show_default=True,
              help="...until it holds this many tokens.")  # fmt: skip
def prepare_data(inputs: tuple[str, ...], out: Path, tokenizer: str | None, train_vocab: int | None, text_field: str,
                 shard_tokens: int, heldout_fraction: float, heldout_tokens: int) -> None:  # fmt: skip
    """Tokenise a corpus once into fixed-size token shards: OUT/shard-*.bin (uint16 or uint32, memory-mappable),
    OUT/heldout.bin, OUT/tokenizer.json and OUT/index.json with each file's SHA-256. Streams: memory does not
    grow with the corpus. Prints the dataset id (SHA-256 of index.json) last.

    \b
    Examples:
      murmur prepare-data --input corpus/ --out data/ --train-tokenizer 16384
      murmur prepare-data --input a.jsonl.zst --input b.parquet --out data/ --tokenizer tokenizer.json
    """
    from peer.core.prepare import PrepareOptions, prepare

    try:
        opts = PrepareOptions(inputs=inputs, out=out, tokenizer=tokenizer, train_vocab=train_vocab,
                              text_field=text_field, shard_tokens=shard_tokens, heldout_fraction=heldout_fraction,
                              heldout_tokens=heldout_tokens)  # fmt: skip
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        done = prepare(opts)
    except (ValueError, OSError) as exc:  # DataError, DataNotFound, SetupError; an unreadable file
        raise click.ClickException(str(exc)) from exc
    index = done.index
    click.echo(f"{len(index.train)} training shard(s), {index.total_tokens - index.heldout.tokens:,} tokens "
               f"({index.documents['train']:,} documents); held out {index.heldout.tokens:,} tokens "
               f"({index.documents['heldout']:,} documents); vocab {index.vocab_size:,} ({index.dtype}), "
               f"tokenizer {index.tokenizer}; in {done.path}")  # fmt: skip
    click.echo(done.dataset_id)
