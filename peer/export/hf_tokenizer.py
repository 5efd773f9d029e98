"""The tokenizer files of an exported model, written as plain JSON (no `tokenizers` or `transformers` needed).

Byte-level runs have no tokenizer file: murmur's ids are the UTF-8 bytes of the text (peer/core/tokenizers.py).
Its Hugging Face twin is a byte-level BPE with no merges: the `ByteLevel` pre-tokenizer maps each byte to one
printable character (GPT-2's table), the vocabulary gives that character the byte's own value as its id,
and with no merges every byte stays one token; the `ByteLevel` decoder maps back and decodes UTF-8 lossily
(U+FFFD for broken sequences, as murmur's `errors="replace"`). So `AutoTokenizer` encodes any text to
exactly murmur's ids, adds no special tokens (there is no id left for one in a 256-token vocabulary, and
murmur trained with none), and round-trips text. A run's own tokenizer.json is copied byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table, the one the `ByteLevel` pre-tokenizer and decoder use: printable
    Latin-1 bytes map to themselves, the other 68 to U+0100 onwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def byte_level_tokenizer() -> dict[str, Any]:
    """A `tokenizer.json` whose ids are the raw UTF-8 bytes of the text (see the module docstring)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    vocab = {char: byte for byte, char in sorted(bytes_to_unicode().items())}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                  "merges": []},  # fmt: skip
    }


def tokenizer_files(tokenizer_file: Path | None, *, max_length: int) -> dict[str, bytes]:
    """{file name: bytes} of the tokenizer: the run's tokenizer.json (None: the byte-level one) and a
    tokenizer_config.json that loads it with transformers' generic fast tokenizer (no custom code)."""
    if tokenizer_file is None:
        tokenizer = json.dumps(byte_level_tokenizer(), ensure_ascii=False, indent=1).encode("utf-8")
    else:
        tokenizer = tokenizer_file.read_bytes()
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        # murmur decodes ids to text as they are; the clean-up would drop spaces before punctuation
        "clean_up_tokenization_spaces": False,
    }
    return {TOKENIZER_FILE: tokenizer, TOKENIZER_CONFIG_FILE: _json_bytes(config)}


def _json_bytes(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")
