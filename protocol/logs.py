"""Logging for every murmur process (protocol, peer, bootstrap): configured once, by the entry point.

Modules only ask for a logger (`get_logger`); importing murmur as a library changes no logging set-up, so
an embedding program's own configuration wins. The `murmur` command (every subcommand, the bootstrap node
included) calls `configure_logging` once at start: one handler on stderr, the level from MURMUR_LOG_LEVEL.
"""

from __future__ import annotations

import logging
import os

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
ROOT = "murmur"


class _MurmurHandler(logging.StreamHandler):
    """Marks the handler `configure_logging` installed, so a second call adds no second one."""


def configure_logging(level: str | None = None) -> None:
    """One stderr handler on the `murmur` logger at `level` (default: MURMUR_LOG_LEVEL, else INFO); idempotent."""
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _MurmurHandler) for h in root.handlers):
        handler = _MurmurHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel((level or os.environ.get("MURMUR_LOG_LEVEL", "INFO")).upper())


def get_logger(name: str) -> logging.Logger:
    """A module's logger under `murmur.`; configures nothing (see `configure_logging`)."""
    return logging.getLogger(f"{ROOT}.{name}")
