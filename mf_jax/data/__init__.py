"""Data sources for mf_jax: toy 2-D distributions, 8x8 digits and the grain pipeline."""
