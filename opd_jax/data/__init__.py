"""Prompt data, host-side only (no JAX): JSONL records and their validation (`records`), chat
templates per tag and prompt padding (`templates`), domain interleaving and each host's
slice of a batch (`prompts`). The names below are the package's API."""

from opd_jax.data.prompts import PromptSampler, host_slice
from opd_jax.data.records import (DataError, Record, VocabMismatchError, load_domains,
                                  read_jsonl, record_dict)
from opd_jax.data.templates import (ON_TOO_LONG, TEMPLATES, PromptEncoder,
                                    check_tokenizers_match, pad_prompts)

__all__ = [
    'PromptSampler', 'host_slice', 'DataError', 'Record', 'VocabMismatchError', 'load_domains',
    'read_jsonl', 'record_dict', 'ON_TOO_LONG', 'TEMPLATES', 'PromptEncoder',
    'check_tokenizers_match', 'pad_prompts',
]
