"""Regenerate murmur's embedded default corpus, peer/corpus/default.txt.gz, from text CPython ships.

Why: a fresh install must be able to train (tests, `murmur simulate`, the demo) with no network and no
dataset download. Every CPython install carries a few MB of English prose written by its developers:
the language reference rendered for `help()` (pydoc_data/topics.py), the docstrings of the standard
library, its comment blocks, and a few .txt/.rst files. All of it is under the Python Software
Foundation License.

Contract: the output depends only on the interpreter's stdlib (run it with CPython 3.11 to reproduce
the committed file byte for byte). Files are read in sorted order; whitespace is normalised; lines that
are mostly code or symbols are dropped; paragraphs that repeat exactly are kept once; the gzip header
carries no file name and mtime 0. Paragraphs are separated by one blank line, which is the unit that
`peer.core.data` uses for its validation split.

Usage: python scripts/build_corpus.py [--out peer/corpus/default.txt.gz] [--stdlib DIR]
"""

from __future__ import annotations

import argparse
import ast
import gzip
import io
import keyword
import re
import sys
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator
from pathlib import Path

# Directories whose text is vendored third-party code or generated tables. Test modules stay in (their
# docstrings and comments are prose too), but the test directories' .txt files are data, not prose.
_SKIP_DIRS = {"site-packages", "__pycache__", "encodings", "lib2to3"}
_SKIP_TEXT_DIRS = _SKIP_DIRS | {"test", "tests", "idle_test"}
# Prose files shipped next to the code (release notes, READMEs, the licence, the email design note).
_TEXT_SUFFIXES = {".txt", ".rst"}
_MIN_WORDS = 6  # a paragraph shorter than this is a label ("Helper function."), not prose
_MIN_LETTER_SHARE = 0.75  # letters and spaces per character below which a line counts as code
_CODE_PREFIXES = (">>>", "...", "$ ", "%", "#!", "|", "+--", "::")
_WORD = re.compile(r"[A-Za-z]{2,}")
_KEYWORDS = frozenset(keyword.kwlist)  # "try:", "else:", "pass", "True" alone on a line are code


def is_prose_line(line: str) -> bool:
    """True when a stripped line reads as text rather than code, a table or rst markup."""
    if not line or line.startswith(_CODE_PREFIXES):
        return False
    letters = sum(ch.isalpha() or ch == " " for ch in line)
    return letters / len(line) >= _MIN_LETTER_SHARE and len(_WORD.findall(line)) >= 1


def normalise_paragraph(lines: Iterable[str]) -> str:
    """Strip lines and drop code lines; '' when too little prose is left.

    Everything from a doctest prompt to the end of the paragraph goes: doctest output runs until the
    next blank line, and it is interpreter output (tracebacks, reprs, pdb sessions), not prose.
    """
    kept: list[str] = []
    for line in (raw.strip() for raw in lines):
        if line.startswith(">>>"):
            break
        if is_prose_line(line) and line.rstrip(":") not in _KEYWORDS:
            kept.append(line)
    text = "\n".join(kept)
    return text if len(_WORD.findall(text)) >= _MIN_WORDS else ""


def split_paragraphs(text: str) -> Iterator[str]:
    """Normalised paragraphs of a text, split at blank lines."""
    for raw in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        paragraph = normalise_paragraph(raw.split("\n"))
        if paragraph:
            yield paragraph


def topics_text() -> Iterator[str]:
    """The language reference as `help()` shows it, topic by topic in sorted order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def source_files(stdlib: Path, suffixes: set[str], skip: set[str]) -> list[Path]:
    """Stdlib files with the given suffixes outside the skipped directories, in sorted order."""
    found = [
        path
        for path in stdlib.rglob("*")
        if path.suffix in suffixes
        and path.is_file()
        and not skip.intersection(path.relative_to(stdlib).parts[:-1])
    ]
    return sorted(found, key=lambda path: path.relative_to(stdlib).as_posix())


def docstrings(tree: ast.AST) -> Iterator[str]:
    """Module, class and function docstrings in source order."""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def comment_blocks(source: str) -> Iterator[str]:
    """Runs of consecutive full-line comments, joined into one text each (license headers included)."""
    block: list[str] = []
    last_row = -2
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT or tok.line.strip() != tok.string.strip():
            continue
        if tok.start[0] != last_row + 1 and block:
            yield "\n".join(block)
            block = []
        block.append(tok.string.lstrip("#").rstrip())
        last_row = tok.start[0]
    if block:
        yield "\n".join(block)


def python_texts(path: Path) -> Iterator[str]:
    """Docstrings, then comment blocks, of one stdlib module; nothing if it does not parse."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        comments = list(comment_blocks(source))
    except (SyntaxError, UnicodeDecodeError, tokenize.TokenError):
        return
    yield from docstrings(tree)
    yield from comments


def build(stdlib: Path) -> str:
    """The whole corpus: topics, then each module's docstrings and comments, then text files."""
    texts: list[Iterable[str]] = [topics_text()]
    texts += [python_texts(path) for path in source_files(stdlib, {".py"}, _SKIP_DIRS)]
    texts += [
        [path.read_text(encoding="utf-8", errors="replace")]
        for path in source_files(stdlib, _TEXT_SUFFIXES, _SKIP_TEXT_DIRS)
    ]
    seen: set[str] = set()
    out: list[str] = []
    for group in texts:
        for text in group:
            for paragraph in split_paragraphs(text):
                if paragraph not in seen:
                    seen.add(paragraph)
                    out.append(paragraph)
    return "\n\n".join(out) + "\n"


def write_gzip(text: str, out: Path) -> int:
    """Write text gzip-compressed with a reproducible header; returns the compressed size."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())
    return len(buffer.getvalue())


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, build, write, and print sizes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_out = Path(__file__).resolve().parent.parent / "peer" / "corpus" / "default.txt.gz"
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    args = parser.parse_args(argv)
    if sys.version_info[:2] != (3, 11):
        print(f"warning: Python {sys.version.split()[0]}; the committed corpus was built with 3.11")
    text = build(args.stdlib)
    size_gz = write_gzip(text, args.out)
    raw = len(text.encode("utf-8"))
    paragraphs = text.count("\n\n") + 1
    print(f"wrote {args.out}: {raw:,} bytes raw, {size_gz:,} bytes gzip, {paragraphs:,} paragraphs")


if __name__ == "__main__":
    main()
