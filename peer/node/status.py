"""What a volunteer watching the terminal sees: the daemon's live status line, kept current.

`StatusReporter` shows a `StatusLine` (peer/node/metrics.py) every `every_s` seconds and right after each
round. On a TTY the line is a tqdm bar holding only that text: tqdm rewrites it in place, cuts it to the
terminal's width, and `tqdm.write` clears it, prints above it and draws it again. The daemon's lines
(`emit`) go through `tqdm.write`, and while the line is drawn the `murmur` logger's console handler is
swapped for tqdm's (`logging_redirect_tqdm`), so neither lands glued to the end of a half-drawn status.
Other writes to the terminal (a child process's, hivemind's p2pd) do not pass through tqdm and may land
after the line; whatever the daemon itself says goes through `emit` or a logger. Off a TTY nothing is
drawn: the round lines and logs stay plain, plus a status log line every `log_every_s`.

The daemon's calls: `start()` on the event loop, `emit(text)` for each stdout line, `aclose()` at stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from peer.node.metrics import Metrics, StatusLine
from protocol.logs import ROOT, get_logger

log = get_logger(__name__)

REDRAW_S = 1.0
"""How often the line is redrawn between rounds (the tokens/s window and peer counts move meanwhile)."""


class StatusReporter:
    """The daemon's status line on `stream` (stderr): redrawn every `every_s` and after each round."""

    def __init__(self, metrics: Metrics, stream: TextIO | None = None, *, out: TextIO | None = None,
                 is_tty: bool | None = None, every_s: float = REDRAW_S, log_every_s: float = 30.0,
                 logger: logging.Logger | None = None) -> None:  # fmt: skip
        self.stream = stream if stream is not None else sys.stderr
        self.out = out
        """Where `emit` prints; None means sys.stdout at the time of the call (pytest's capsys swaps it)."""
        self.is_tty = _isatty(self.stream) if is_tty is None else is_tty
        self.line = StatusLine(metrics, log_every_s=log_every_s, logger=logger)
        self.every_s = every_s
        self._task: asyncio.Task | None = None
        self._bar: tqdm | None = None
        self._undo = contextlib.ExitStack()

    def start(self) -> None:
        """Draw now and every `every_s` from the running event loop; on a TTY, log records go above the line."""
        if self._task is not None:
            raise RuntimeError("status reporter already started")
        if self.is_tty:
            self._bar = tqdm(file=self.stream, bar_format="{desc}", dynamic_ncols=True, leave=True)
            murmur = logging.getLogger(ROOT)
            if any(_on_console(h) for h in murmur.handlers):  # else there is no console output to keep apart
                self._undo.enter_context(logging_redirect_tqdm(loggers=[murmur]))
        self.redraw()
        self._task = asyncio.get_running_loop().create_task(self._redraw_every())

    async def _redraw_every(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            self.redraw()

    def redraw(self) -> None:
        """Show the current values (TTY) or log them if due (otherwise)."""
        try:
            text = self.line.update(drawn=self._bar is not None)
            if self._bar is not None:
                self._bar.set_description_str(text)
        except (OSError, ValueError) as exc:  # a closed or broken terminal must not stop training
            log.debug("status line not drawn: %r", exc)

    def emit(self, text: str) -> None:
        """Print `text` on stdout as its own line (the round and eval lines), above the status line."""
        out = self.out if self.out is not None else sys.stdout
        tqdm.write(text, file=out)
        out.flush()
        self.redraw()

    async def aclose(self) -> None:
        """Stop redrawing, leave the last status on its own line and restore logging; safe twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._undo.close()
        bar, self._bar = self._bar, None
        if bar is not None:
            with contextlib.suppress(OSError, ValueError):
                bar.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream
        return False


def _on_console(handler: logging.Handler) -> bool:
    """The test `logging_redirect_tqdm` applies: a stream handler writing to the process's stdout or stderr."""
    return isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr)
