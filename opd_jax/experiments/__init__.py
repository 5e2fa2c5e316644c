"""Experiments that chain several ordinary trainer runs (each stage is `opd_jax.train.run`)."""
