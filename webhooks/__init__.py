"""Trimo's GitHub webhook receiver: verify deliveries, turn them into intents, record them."""
