"""Evaluation metrics for mf_jax: sample-set distances and the FD-digits feature space."""
