"""The trainer's parts below `opd_jax.train`: the builder (config -> typed specs, models,
jitted steps), config checks, batch steps, the update and optimizer, evaluation,
checkpoints, metrics and FLOP accounting. These modules (with the tools and experiments) are
the only ones that read a `ConfigDict`."""
