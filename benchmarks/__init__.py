"""Benchmarks for mmfree_jax; `python -m benchmarks.run_all` regenerates results/ and RESULTS.md."""
