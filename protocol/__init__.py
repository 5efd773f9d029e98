"""The wire: everything that crosses the network between peers, and nothing about training."""

import functools
from importlib import metadata

PROTOCOL_VERSION = "1.0"
PROTOCOL_MAJOR = 1
UNKNOWN_SOFTWARE_VERSION = "0.0.0+unknown"
"""What a source tree that was never installed calls itself: a valid version that sorts below every release."""


def protocol_major(version: str) -> int:
    """The major number of a "MAJOR.MINOR" protocol version from a stranger's record or manifest; -1 when
    it does not parse, so that it never equals ours and is refused as incompatible."""
    try:
        return int(version.split(".", 1)[0])
    except ValueError:
        return -1


@functools.cache
def software_version() -> str:
    """The installed murmur distribution's version (`UNKNOWN_SOFTWARE_VERSION` when running from a bare tree)."""
    try:
        return metadata.version("murmur")
    except metadata.PackageNotFoundError:
        return UNKNOWN_SOFTWARE_VERSION
