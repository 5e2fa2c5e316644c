"""Teachers: the protocol and specs (`base`), in-process teachers (`local`) and chunked
scoring (`scoring`), the SGLang / vLLM wire protocol (`wire`), the HTTP client (`remote`) and
the scoring server (`server`, `python -m opd_jax.teachers.server`)."""
