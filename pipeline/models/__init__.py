"""Models shared by the stages, the filters and training: CLIP loading and its fast text
path, the safety/aesthetic head nets, the VAE and its latents. Nothing here imports a stage."""
