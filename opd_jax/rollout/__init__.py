"""Rollout engines: the shared prefill and decode pieces (`decode`), the static sampler,
continuous batching and multi-turn episodes. They take typed specs (`SamplingParams`,
`Budgets`), never a config."""
