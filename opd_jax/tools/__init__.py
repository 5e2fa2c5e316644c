"""Commands around the trainer: the AOT compile check (`python -m opd_jax.tools.aot`), the
teacher pre-flight check (`python -m opd_jax.tools.check_teacher`) and the CPU demo
(`python -m opd_jax.tools.demo`)."""
