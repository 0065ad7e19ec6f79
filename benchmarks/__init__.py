"""Benchmarks for mmfree_jax; `python -m benchmarks.run_all --commit_results` regenerates
results/ and RESULTS.md."""
