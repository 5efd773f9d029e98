"""The docs' fenced code blocks, and a terminal to run a page's shell blocks in (tests/test_docs_commands.py).

Why: every command a page shows is either run by the docs test or names the test that covers it, so the docs
cannot drift from the code again (issue 18). This module is the mechanism, tested on its own; the test file
holds the policy (which pages run, what stands in for a public address, what each page must have done).

A block is a fence (three or more backticks or tildes) with an info string: its first word is the language,
the rest its meta (`title="run.toml"` names the file the page tells the reader to save it as). Shell blocks
(sh, bash, shell, console) are the commands. One may be covered elsewhere instead of run here, by an HTML comment
on the line right before its fence:

    <!-- docs-test: covered by tests/test_demo.py::test_demo_runs_end_to_end_and_leaves_nothing_running (why) -->

A page's shell blocks run in order as one bash script in a pseudo-terminal, as a user's terminal runs them: a
foreground command gets Ctrl-C from the keyboard (`Terminal.ctrl_c`, the whole foreground process group, the
DHT helpers included), a `... &` job does not, and a status line is drawn because stderr is a terminal.
"""

from __future__ import annotations

import ast
import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import termios
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SHELLS = frozenset({"sh", "bash", "shell", "console"})
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*covered by\s+(?P<tests>[^()]+?)\s+\((?P<reason>.+)\)\s*-->\s*$")
MARKER_HINT = "<!-- docs-test: covered by tests/FILE.py::TEST_NAME (why it cannot run here) -->"
ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>78])")


class DocsError(AssertionError):
    """A page whose blocks are not all accounted for: one `file:line: what` per problem."""


@dataclass(frozen=True, slots=True)
class Block:
    """One fenced code block of a page."""

    path: str
    """The page, as the messages name it (relative to the repository)."""
    line: int
    """1-based line of the opening fence."""
    lang: str
    meta: str
    text: str
    covered_by: tuple[str, ...] = ()
    """`tests/FILE.py::NAME` of the tests that cover this block instead of the docs test (its docs-test comment)."""

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.lang in SHELLS

    @property
    def title(self) -> str | None:
        """The file name of `title="..."` in the meta, if any."""
        found = re.search(r'\btitle="([^"]+)"', self.meta)
        return found[1] if found else None

    def commands(self) -> str:
        """The text bash runs: the block itself, or of a `console` block only its `$ ` lines, prompt removed."""
        if self.lang != "console":
            return self.text
        return "".join(line[2:] + "\n" for line in self.text.splitlines() if line.startswith("$ "))


def read_blocks(path: Path, shown: str) -> tuple[list[Block], list[str]]:
    """Every fenced block of the Markdown file `path` (named `shown` in messages), and the problems met reading
    it: an unclosed fence, a block without a language, a docs-test comment that is malformed or not right before a
    shell block."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    index = 0
    while index < len(lines):
        if lines[index].lstrip().startswith("<!--") and "docs-test" in lines[index]:
            problems += _marker_problems(lines, index, shown)
        opened = FENCE.match(lines[index])
        if opened is None:
            index += 1
            continue
        fence, info = opened["fence"], opened["info"].strip()
        close = next((j for j in range(index + 1, len(lines))
                      if lines[j].strip().startswith(fence[0] * len(fence)) and not lines[j].strip(fence[0]).strip()),
                     None)  # fmt: skip
        where = f"{shown}:{index + 1}"
        if close is None:
            problems.append(f"{where}: this {fence} fence is never closed")
            break
        lang, _, meta = info.partition(" ")
        if not lang:
            problems.append(f"{where}: a code block without a language: mark commands ```sh, output ```text")
        indent = len(opened["indent"])
        text = "".join(_dedent(line, indent) + "\n" for line in lines[index + 1 : close])
        marker = MARKER.match(lines[index - 1]) if index > 0 else None
        covered = tuple(t.strip() for t in marker["tests"].split(",")) if marker else ()
        blocks.append(Block(shown, index + 1, lang.lower(), meta.strip(), text, covered))
        index = close + 1
    return blocks, problems


def _dedent(line: str, indent: int) -> str:
    """A block's line without its fence's indentation (a fence inside a list item is indented)."""
    if not indent or line[:indent].isspace():
        return line[indent:]
    return line.lstrip()


def _marker_problems(lines: list[str], index: int, shown: str) -> list[str]:
    """What is wrong with the docs-test comment on line `index`, if anything."""
    where = f"{shown}:{index + 1}"
    if MARKER.match(lines[index]) is None:
        return [f"{where}: cannot read this docs-test comment; write {MARKER_HINT}"]
    following = FENCE.match(lines[index + 1]) if index + 1 < len(lines) else None
    if following is None:
        return [f"{where}: a docs-test comment must be on the line right before the block it covers"]
    if following["info"].strip().partition(" ")[0].lower() not in SHELLS:
        return [f"{where}: a docs-test comment before a block that is not a shell block (only those run)"]
    return []


def missing_tests(block: Block, root: Path) -> list[str]:
    """The tests a covered block names that do not exist (a file, then a function or Class::method in it)."""
    problems = []
    for ref in block.covered_by:
        file, _, name = ref.partition("::")
        path = root / file
        if not name or not file.startswith("tests/") or not path.is_file():
            problems.append(f"{block.where}: covered by {ref!r}, but there is no such test file")
        elif name not in _test_names(path):
            problems.append(f"{block.where}: covered by {ref!r}, but {file} has no test {name}")
    return problems


def _test_names(path: Path) -> set[str]:
    """`name` and `Class::name` of every function defined at the top of `path` or in its classes."""
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.update(f"{node.name}::{f.name}" for f in node.body
                         if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef))  # fmt: skip
    return names


def unaccounted(blocks: list[Block], run_pages: set[str], where_run: str) -> list[str]:
    """Shell blocks that no test runs: neither covered by a named test nor on a page that `where_run` runs."""
    return [f"{b.where}: a ```{b.lang} block that no test runs: add its page to {where_run}, or put "
            f"{MARKER_HINT} on the line before it" for b in blocks
            if b.is_shell and not b.covered_by and b.path not in run_pages]  # fmt: skip


def page_script(blocks: list[Block], substitutions: dict[str, str]) -> tuple[str, list[str], list[str]]:
    """The bash script of a page's shell blocks (those not covered elsewhere) in order, every substitution
    applied; the page's file:line of each script line (so a failure names the doc, not the script); and a
    problem for each substitution that does not match exactly once (so the table cannot drift either)."""
    lines = ["set -euo pipefail", "set -m  # job control, as in a terminal: `cmd &` runs in its own process group",
             'trap \'echo "docs-test: script line $LINENO exited $?" >&2\' ERR']  # fmt: skip
    origins = ["", "", ""]
    for block in (b for b in blocks if b.is_shell and not b.covered_by):
        commands = block.commands().splitlines()
        lines += commands
        if block.lang == "console":
            origins += [block.where] * len(commands)
        else:
            origins += [f"{block.path}:{block.line + 1 + i}" for i in range(len(commands))]
    script = "\n".join(lines) + "\n"
    problems = []
    for old, new in substitutions.items():
        if (count := script.count(old)) != 1:
            problems.append(f"{blocks[0].path}: the substitution of {old!r} matches {count} times, not once")
        script = script.replace(old, new)
    return script, origins, problems


def failed_line(screen: str, origins: list[str]) -> str | None:
    """The page's file:line of the command that stopped the script, if any: its ERR trap's line, or the line of
    an error bash reports itself (an unset variable under `set -u` skips the trap)."""
    found = re.findall(r"docs-test: script line (\d+) exited (\d+)|\.sh: line (\d+): (.*)", screen)
    if not found:
        return None
    trapped, code, reported, message = found[-1]
    line = int(trapped or reported)
    where = origins[line - 1] if 0 < line <= len(origins) else f"script line {line}"
    return f"{where}: exited {code}" if trapped else f"{where}: {message.strip()}"


def session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (a page's script and every job it started, each in its own group); zombies
    are not counted (the script itself stays one until `Terminal.close`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _ppid, _pgrp, session = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, IndexError, ValueError):
            continue
        if int(session) == sid and state != "Z":
            pids.append(int(entry.name))
    return pids


class Terminal:
    """A bash script run in a pseudo-terminal it controls, in a session of its own; the screen is kept as text
    (escape sequences removed, a carriage return counted as a new line) and in `log`."""

    def __init__(self, script: Path, cwd: Path, env: dict[str, str], log: Path, columns: int = 200) -> None:
        self.log = log
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
        # setsid --ctty: bash leads a new session whose controlling terminal this is, so Ctrl-C reaches its
        # foreground job only, as at a keyboard
        self.popen = subprocess.Popen(["setsid", "--ctty", "bash", str(script)], stdin=slave, stdout=slave,
                                      stderr=slave, cwd=cwd, env=env, close_fds=True)  # fmt: skip
        os.close(slave)
        self.master = master
        self._raw = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="docs-terminal", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.log, "wb") as out:
            while True:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: no process holds the terminal any more
                    return
                if not data:
                    return
                out.write(data)
                out.flush()
                with self._lock:
                    self._raw += data

    def text(self) -> str:
        with self._lock:
            raw = bytes(self._raw)
        return ANSI.sub("", raw.decode(errors="replace")).replace("\r\n", "\n").replace("\r", "\n")

    def tail(self, lines: int = 80) -> str:
        """The screen's last `lines` lines that are not blank (what a failure quotes)."""
        return "\n".join([line for line in self.text().splitlines() if line.strip()][-lines:])

    def ctrl_c(self) -> None:
        """What the keyboard's Ctrl-C does: SIGINT to the terminal's foreground process group."""
        os.write(self.master, b"\x03")

    def exit_code(self) -> int | None:
        """The script's exit code once it has ended (None before), read without reaping it: until `close`, its
        pid stays taken, so no other process can start a session with its number, which `close` would stop."""
        info = os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.exit_code()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"the script still runs after {timeout:.0f}s\n{self.tail()}")
            time.sleep(0.2)
        return code

    def close(self, grace: float = 15.0) -> None:
        """SIGTERM every process of the script's session, SIGKILL what is left after `grace` seconds (each `&` job
        is a process group of its own, so the session is what holds them all), then close the terminal."""
        sid = self.popen.pid
        for pid in session_pids(sid):
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in session_pids(sid):
            _signal(pid, signal.SIGKILL)
        try:
            self.popen.wait(10)  # reaped only now (`exit_code`)
        finally:
            os.close(self.master)
            self._reader.join(5)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@dataclass(frozen=True, slots=True)
class CtrlC:
    """Press Ctrl-C once every pattern has appeared: `(None, regex)` on the screen since the last key press,
    `(name, regex)` in the file `name` of the page's working directory (a backgrounded command's log)."""

    when: tuple[tuple[str | None, str], ...]
    timeout: float = 240.0
    """A bound that says the page's step ends, not how fast: fresh22 (three test workers on two cores) took over
    120 s for run-owner.md's owner to start and train a round."""


def press_when_seen(term: Terminal, workdir: Path, steps: tuple[CtrlC, ...]) -> None:
    """Follow `steps` in order, as a user who waits for what the page says comes, then presses Ctrl-C; fails
    with the screen when the script ends first or a step's patterns do not all appear within its timeout."""
    mark = 0
    for step in steps:
        deadline = time.monotonic() + step.timeout
        while not all(_seen(term, workdir, source, pattern, mark) for source, pattern in step.when):
            if term.exit_code() is not None or time.monotonic() > deadline:
                why = "the script ended" if term.exit_code() is not None else f"not within {step.timeout:.0f}s"
                raise AssertionError(f"{why}: waiting for {step.when}\n{term.tail()}")
            time.sleep(0.2)
        mark = len(term.text())
        term.ctrl_c()


def _seen(term: Terminal, workdir: Path, source: str | None, pattern: str, mark: int) -> bool:
    if source is None:
        text = term.text()[mark:]
    else:
        try:
            text = (workdir / source).read_text(errors="replace")
        except FileNotFoundError:
            return False
    return re.search(pattern, text, re.MULTILINE) is not None
