"""Synthetic tasks that opd_jax generates itself (the CPU demo needs no downloads)."""
