"""Benchmarks of the data path: `python -m benchmarks.bench_loader`, `python -m benchmarks.bench_round`."""
