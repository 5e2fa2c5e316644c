"""Accelerator benchmark: a Qwen3-0.6B-shaped random student, a Qwen3-1.7B-shaped teacher
(bf16, batch 64, 512-token prompts, 1,024 new tokens; random weights written locally from
opd_jax.models.presets shapes, never downloaded), run as whole OPD steps by
opd_jax.bench.step. Prints the update's MFU and the decode's achieved HBM bandwidth (student
weights + mean KV cache read once per decode step) against the chip's peak.
`--dry-run`: CPU, tiny shapes. Driven by bench/accelerator.sh."""

import argparse
import os
import tempfile

# device_kind substring -> (bf16 dense FLOP/s, HBM bytes/s)
PEAKS = {'H200': (989e12, 4.8e12), 'H100': (989e12, 3.35e12), 'A100': (312e12, 2.0e12)}


def peak_for(kind: str):
  for k, v in PEAKS.items():
    if k.lower() in kind.lower():
      return v
  return None


def write_model(path, preset, *, vocab, seed, tiny):
  from opd_jax.models.presets import PRESETS
  from opd_jax.models.tiny import build_char_tokenizer, make_tiny_checkpoint
  h = PRESETS[preset]
  if tiny:  # same family and head layout, tiny sizes
    kw = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
              intermediate_size=128)
  else:
    kw = dict(hidden_size=h['hidden_size'], num_layers=h['num_hidden_layers'],
              num_heads=h['num_attention_heads'], num_kv_heads=h['num_key_value_heads'],
              head_dim=h['head_dim'], intermediate_size=h['intermediate_size'])
  return make_tiny_checkpoint(path, family='qwen3', tokenizer=build_char_tokenizer(
      vocab_size=vocab), seed=seed, tie_embeddings=h['tie_word_embeddings'],
      max_position_embeddings=4096, **kw)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument('--dry-run', action='store_true')
  ap.add_argument('--workdir', default=None)
  args = ap.parse_args(argv)
  import jax
  from opd_jax.bench import step

  tiny = args.dry_run
  B, P, N, steps, dtype = (8, 8, 8, 1, 'float32') if tiny else (64, 512, 1024, 2, 'bfloat16')
  vocab = 512 if tiny else 151936
  wd = args.workdir or tempfile.mkdtemp(prefix='opd_accel_')
  s_dir = write_model(os.path.join(wd, 'student'), 'Qwen3-0.6B', vocab=vocab, seed=0, tiny=tiny)
  t_dir = write_model(os.path.join(wd, 'teacher'), 'Qwen3-1.7B', vocab=vocab, seed=1, tiny=tiny)
  res = step.main(['--student', s_dir, '--teacher', t_dir, '--batch', str(B), '--prompt-len',
                   str(P), '--new-tokens', str(N), '--steps', str(steps), '--dtype', dtype,
                   '--peak-size', '256' if tiny else '4096'])
  kind = jax.devices()[0].device_kind
  peaks = peak_for(kind)
  cfg = res['cfg']
  bpe = 4 if dtype == 'float32' else 2
  weight_bytes = cfg.num_params * bpe
  kv_per_tok = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * bpe
  mean_ctx = P + N / 2
  decode_bytes = N * (weight_bytes + B * mean_ctx * kv_per_tok)  # fixed lengths: N steps
  t_roll, _ = res['rollout']
  t_upd, f_upd = res['update']
  bw = decode_bytes / t_roll
  flops_s = f_upd / t_upd
  print(f'device_kind={kind} peaks(bf16 FLOP/s, HBM B/s)={peaks}')
  print(f'decode_hbm_GBps={bw / 1e9:.1f}' + (f' frac_hbm_peak={bw / peaks[1]:.3f}' if peaks else ''))
  print(f'update_TFLOPs={flops_s / 1e12:.3f}' + (f' update_mfu={flops_s / peaks[0]:.3f}' if peaks
                                                   else ' update_mfu=n/a (unknown chip)'))
  print('ACCELERATOR_CHECK_DONE')


if __name__ == '__main__':
  main()
