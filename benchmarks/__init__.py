"""Benchmark suite of meanfield_tf: run `python -m benchmarks.run` (see `run.py`)."""
