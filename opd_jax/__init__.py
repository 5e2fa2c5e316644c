"""opd_jax: on-policy distillation of language models in JAX, from a laptop CPU to a TPU pod."""

import logging as _logging

__version__ = '0.1.0'


class _NoTorchAdvice(_logging.Filter):
  """Drops exactly transformers' import-time advice 'PyTorch was not found. Models won't be
  available ...': opd_jax uses transformers for tokenizers and configs only, never its
  models, so the line only misleads. Every other transformers message passes."""

  def filter(self, record):
    return not str(record.msg).startswith('PyTorch was not found.')


# Installed on import (before any module imports transformers), the package's only side
# effect; the filter touches no other logger and no other message.
if not any(isinstance(f, _NoTorchAdvice) for f in _logging.getLogger('transformers').filters):
  _logging.getLogger('transformers').addFilter(_NoTorchAdvice())
