"""A long-lived DHT node that peers find their swarm through. Trains nothing."""
