"""Logging set-up shared by every murmur process (protocol, peer, bootstrap): level from MURMUR_LOG_LEVEL."""

from __future__ import annotations

import logging
import os

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    """A module logger; configures the root handler once, at the level MURMUR_LOG_LEVEL names."""
    root = logging.getLogger("murmur")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("MURMUR_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    return logging.getLogger(f"murmur.{name}")
