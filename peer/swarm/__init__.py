"""Swarm membership: who is in the swarm, who has earned a place, and the one join sequence."""
