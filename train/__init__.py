"""Latent-diffusion fine-tuning on curated shards."""
