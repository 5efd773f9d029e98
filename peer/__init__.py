"""One volunteer's process: model, data, parameter slices, inner and outer loops, simulator, CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("murmur")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
