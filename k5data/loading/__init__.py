"""Streaming latent shards into training batches (report §6.1.2)."""
