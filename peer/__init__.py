"""One volunteer's process: model, data, parameter slices, inner and outer loops, simulator, CLI."""

from protocol import software_version

__version__ = software_version()
