"""mf_jax: one-step generative models (MeanFlow and its family) in JAX."""
