"""The model gateway: the run's agent reaches its model through it, never with the real key."""
