"""The wire: everything that crosses the network between peers, and nothing about training."""

PROTOCOL_VERSION = "1.0"
PROTOCOL_MAJOR = 1
