"""Experiments around the peers: the simulator, comparisons, evaluation, the demo and its process harness."""
