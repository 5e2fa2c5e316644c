"""The OPD math as pure JAX functions (docs/design.md §3): per-token reverse-KL estimates,
advantages (pure OPD, mixed, G-OPD; outcome-reward estimators), the policy loss and its
aggregation, top-k and full-vocabulary divergences. No models, no config."""
