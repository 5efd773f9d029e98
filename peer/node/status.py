"""What a volunteer watching the terminal sees: the daemon's live status line, kept current.

`StatusReporter` owns a `StatusLine` (peer/node/metrics.py) and redraws it on stderr every `every_s`
seconds and right after each round. On a TTY the line is rewritten in place; anything else written to
the terminal (the per-round stdout line, log records) first erases it, so no output lands glued to the
end of a half-drawn status, and the next redraw puts it back under them. Off a TTY nothing is redrawn:
the round lines and logs stay as they were, plus a plain status log line every `log_every_s`. Output
from child processes (hivemind's p2pd) cannot be intercepted and may still land after the line.

The daemon's calls: `start()` on the event loop, `emit(text)` for each stdout line, `aclose()` at stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import TextIO

from peer.node.metrics import Metrics, StatusLine

REDRAW_S = 1.0
"""How often the line is redrawn between rounds (the tokens/s window and peer counts move meanwhile)."""


class _EraseBeforeRecord(logging.Filter):
    """Erases the status line before a log record is written under it (a filter runs before emit)."""

    def __init__(self, reporter: StatusReporter) -> None:
        super().__init__()
        self.reporter = reporter

    def filter(self, record: logging.LogRecord) -> bool:
        self.reporter.erase()
        return True


class _EraseBeforeWrite:
    """sys.stdout while the line is drawn on a terminal: any print (the peer-list notices, say) erases the
    status line first instead of landing glued to its end. Everything else is the wrapped stream's."""

    def __init__(self, stream: TextIO, reporter: StatusReporter) -> None:
        self.wrapped, self.reporter = stream, reporter

    def write(self, text: str) -> int:
        if text:
            self.reporter.erase()
        return self.wrapped.write(text)

    def __getattr__(self, name: str) -> object:
        return getattr(self.wrapped, name)


class StatusReporter:
    """The daemon's status line on `stream` (stderr): redrawn every `every_s` and after each round."""

    def __init__(self, metrics: Metrics, stream: TextIO | None = None, *, out: TextIO | None = None,
                 is_tty: bool | None = None, every_s: float = REDRAW_S, log_every_s: float = 30.0,
                 logger: logging.Logger | None = None) -> None:  # fmt: skip
        self.stream = stream if stream is not None else sys.stderr
        self.out = out
        """Where `emit` prints; None means sys.stdout at the time of the call (pytest's capsys swaps it)."""
        self.line = StatusLine(metrics, self.stream, is_tty=is_tty, log_every_s=log_every_s, logger=logger)
        self.every_s = every_s
        self._task: asyncio.Task | None = None
        self._filter = _EraseBeforeRecord(self)
        self._handlers: list[logging.Handler] = []
        self._stdout: _EraseBeforeWrite | None = None

    @property
    def is_tty(self) -> bool:
        return self.line.is_tty

    def start(self) -> None:
        """Draw now and every `every_s` from the running event loop; on a TTY, log records erase the line."""
        if self._task is not None:
            raise RuntimeError("status reporter already started")
        if self.is_tty:
            self._handlers = [h for h in logging.getLogger("murmur").handlers if _writes_to(h, self.stream)]
            for handler in self._handlers:
                handler.addFilter(self._filter)
            if _isatty(sys.stdout):  # the same terminal: prints to it erase the line too
                self._stdout = _EraseBeforeWrite(sys.stdout, self)
                sys.stdout = self._stdout
        self.redraw()
        self._task = asyncio.get_running_loop().create_task(self._redraw_every())

    async def _redraw_every(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            self.redraw()

    def redraw(self) -> None:
        """Show the current values (TTY) or log them if due (otherwise)."""
        try:
            self.line.update()
        except (OSError, ValueError) as exc:  # a closed or broken terminal must not stop training
            logging.getLogger("murmur.peer.node.status").debug("status line not drawn: %r", exc)

    def erase(self) -> None:
        """Clear the drawn line (TTY only) so the next output starts at column 0 of an empty line."""
        if self.is_tty and self.line.drawn:
            with contextlib.suppress(OSError, ValueError):
                self.stream.write("\r\x1b[2K")
                self.stream.flush()
            self.line.drawn = False

    def emit(self, text: str) -> None:
        """Print `text` on stdout as its own line (the round and eval lines), then redraw the status under it."""
        self.erase()
        print(text, file=self.out if self.out is not None else sys.stdout, flush=True)
        self.redraw()

    async def aclose(self) -> None:
        """Stop redrawing, end the status line with a newline and take the log filter off; safe twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for handler in self._handlers:
            handler.removeFilter(self._filter)
        self._handlers = []
        if self._stdout is not None and sys.stdout is self._stdout:
            sys.stdout = self._stdout.wrapped
        self._stdout = None
        with contextlib.suppress(OSError, ValueError):
            self.line.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream
        return False


def _writes_to(handler: logging.Handler, stream: TextIO) -> bool:
    return isinstance(handler, logging.StreamHandler) and handler.stream is stream
