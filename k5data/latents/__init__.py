"""VAE pre-encoding of curated rows into latent tar shards with a Parquet index (report §6.1.1)."""
