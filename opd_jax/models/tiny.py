"""Tiny, self-made Hugging Face checkpoints and tokenizers.

Used by the `:runlocal` form of every recipe, the CPU demo and the tests, so nothing needs
a model hub. The checkpoints are ordinary HF directories (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with a chat template), loadable by both opd_jax and
transformers.
"""

from __future__ import annotations

import os
import string

import jax.numpy as jnp

# A ChatML template (the Qwen family's format) with Qwen3's `enable_thinking` switch: with
# thinking disabled the assistant turn starts with an empty think block, as Qwen3 does.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)

SPECIAL_TOKENS = ('<|endoftext|>', '<|im_start|>', '<|im_end|>', '<think>', '</think>')
DEFAULT_CHARS = string.digits + string.ascii_letters + string.punctuation + ' \n'


def build_char_tokenizer(chars: str = DEFAULT_CHARS, *, chat_template: str = CHATML_TEMPLATE,
                         vocab_size: int | None = None):
  """A character-level `PreTrainedTokenizerFast` with ChatML special tokens.

  Ids: the special tokens first (pad = <|endoftext|> = 0, eos = <|im_end|>), then one id per
  character. `vocab_size` pads the vocabulary with unused `<|extra_i|>` tokens (the model's
  embedding size then matches the tokenizer's length exactly).
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
  for ch in dict.fromkeys(chars):
    vocab.setdefault(ch, len(vocab))
  if vocab_size is not None:
    if vocab_size < len(vocab):
      raise ValueError(f'vocab_size={vocab_size} is below the {len(vocab)} tokens needed')
    for i in range(vocab_size - len(vocab)):
      vocab[f'<|extra_{i}|>'] = len(vocab)
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.Split('', behavior='isolated')
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token='<|endoftext|>', eos_token='<|im_end|>',
      additional_special_tokens=list(SPECIAL_TOKENS[1:]))
  fast.chat_template = chat_template
  return fast


# A Llama-3-style template and special tokens for the byte-level BPE tokenizer below: a
# teacher that differs from the char-level student in vocabulary *and* chat template.
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content']"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
BPE_SPECIAL_TOKENS = ('<|end_of_text|>', '<|begin_of_text|>', '<|start_header_id|>',
                      '<|end_header_id|>', '<|eot_id|>')


def default_bpe_corpus() -> list[str]:
  """A fixed training text for the tiny BPE: the sample prompts' kind of English, column
  additions written out as the demo writes them, and every character of the char-level
  vocabulary (deterministic: the same merges every time)."""
  import random
  rng = random.Random(0)
  words = ('the sum of and is answer what write a python function that returns number add '
           'digit carry column result question say hello name color capital count three '
           'you are helpful assistant reply with one guess my from to def return print '
           'read two integers input output line standard smaller minimum maximum').split()
  lines = [DEFAULT_CHARS, ' '.join(words)]
  for _ in range(400):
    a, b = rng.randrange(1000), rng.randrange(1000)
    lines.append(f'What is {a} + {b}? {a} + {b} = {a + b}. The answer is {a + b}.')
    lines.append(' '.join(rng.choice(words) for _ in range(12)) + '.')
  return lines


def build_bpe_tokenizer(vocab_size: int = 384, *, corpus=None,
                        chat_template: str = LLAMA3_TEMPLATE, split_digits: bool = False):
  """A byte-level BPE `PreTrainedTokenizerFast` trained here with the `tokenizers` library
  (no hub) on `corpus` (default: `default_bpe_corpus()`), with Llama-3-style special tokens
  first (pad = <|end_of_text|> = 0, eos = <|eot_id|>) and `chat_template`. `split_digits`:
  every digit is its own token (as Qwen's tokenizers do); otherwise digits merge too."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  if split_digits:
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 tok.pre_tokenizer])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BPE_SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(list(corpus if corpus is not None else default_bpe_corpus()),
                          trainer=trainer)
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token='<|end_of_text|>', eos_token='<|eot_id|>',
      bos_token='<|begin_of_text|>', additional_special_tokens=list(BPE_SPECIAL_TOKENS[2:4]))
  fast.chat_template = chat_template
  return fast


def make_tiny_checkpoint(path: str, *, family: str = 'qwen3', hidden_size: int = 64,
                         num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                         head_dim: int | None = None, intermediate_size: int | None = None,
                         tokenizer=None, vocab_size: int | None = None, seed: int = 0,
                         tie_embeddings: bool | None = None, max_position_embeddings: int = 4096,
                         overwrite: bool = False, bpe: int = 0) -> str:
  """Writes a random tiny model of `family` ('qwen3' | 'qwen2' | 'llama') plus a tokenizer:
  `tokenizer`, else a byte-level BPE of `bpe` tokens when bpe > 0 (`build_bpe_tokenizer`),
  else the char-level one.

  Returns `path`. If the directory already holds a config.json and `overwrite` is False,
  it is left as is (so recipes can call this idempotently).
  """
  from opd_jax.models import ModelConfig, create_model, save_pretrained

  if os.path.exists(os.path.join(path, 'config.json')) and not overwrite:
    return path
  if tokenizer is None and bpe:
    tokenizer = build_bpe_tokenizer(bpe)
  tokenizer = tokenizer or build_char_tokenizer(vocab_size=vocab_size)
  vocab = len(tokenizer)
  head_dim = head_dim or hidden_size // num_heads
  rope_scaling = None
  if family == 'llama':
    rope_scaling = tuple(sorted(dict(
        rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64).items()))
  cfg = ModelConfig(
      model_type=family, vocab_size=vocab, hidden_size=hidden_size,
      intermediate_size=intermediate_size or 3 * hidden_size, num_layers=num_layers,
      num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
      rope_theta=10000.0 if family != 'llama' else 500000.0, rope_scaling=rope_scaling,
      max_position_embeddings=max_position_embeddings,
      tie_embeddings=(family == 'qwen3') if tie_embeddings is None else tie_embeddings,
      qk_norm=family == 'qwen3', qkv_bias=family == 'qwen2')
  hf_extra = dict(
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
      bos_token_id=None)
  model = create_model(cfg, seed=seed, dtype=jnp.float32, hf_config=hf_extra)
  save_pretrained(model, path)
  tokenizer.save_pretrained(path)
  return path


def resolve_model(spec: str | None) -> str | None:
  """A model path, or `tiny:FAMILY[:key=value,...]` made on first use in a cache directory.

  e.g. `tiny:qwen3:hidden_size=64,num_layers=2,seed=1`. The cache is $OPD_JAX_CACHE or
  ~/.cache/opd_jax; checkpoints are written to a temporary directory and renamed, so
  concurrent processes never see a half-written one. Every tiny model shares the same
  char-level tokenizer, so tiny students and teachers are vocabulary-compatible, except with
  `bpe=N`: a byte-level BPE of N tokens with a Llama-3-style template (a cross-tokenizer
  teacher).
  """
  if not spec or not spec.startswith('tiny:'):
    return spec
  import hashlib
  import shutil
  import tempfile
  parts = spec.split(':', 2)
  family = parts[1]
  kwargs = {}
  if len(parts) > 2 and parts[2]:
    for item in parts[2].split(','):
      k, _, v = item.partition('=')
      try:
        kwargs[k.strip()] = int(v)
      except ValueError as e:
        raise ValueError(f'model spec {spec!r}: {k}={v!r} is not an integer') from e
  root = os.environ.get('OPD_JAX_CACHE', os.path.expanduser('~/.cache/opd_jax'))
  path = os.path.join(root, 'tiny', hashlib.sha1(spec.encode()).hexdigest()[:12] + '-' + family)
  if os.path.exists(os.path.join(path, 'config.json')):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(path))
  make_tiny_checkpoint(tmp, family=family, overwrite=True, **kwargs)
  try:
    os.rename(tmp, path)
  except OSError:  # another process won the race; its copy is identical
    shutil.rmtree(tmp, ignore_errors=True)
  return path
