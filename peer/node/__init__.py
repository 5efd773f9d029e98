"""One volunteer's process: trainer, gossip, daemon, checkpoints, resume, late join, metrics, status."""
