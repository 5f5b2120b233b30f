"""Command-line tools: `python -m mf_jax.tools.<name> --help`."""
