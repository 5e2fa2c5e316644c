"""opd_jax: on-policy distillation of language models in JAX, from a laptop CPU to a TPU pod."""

__version__ = '0.1.0'
