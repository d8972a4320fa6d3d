"""Benchmarks with same-run baselines: `python -m bench.run` runs them all and writes docs/performance.md."""
