"""Command-line tools that prepare inputs for training (`python -m reco_jax.tools.<name>`)."""
