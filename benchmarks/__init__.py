"""Benchmark scripts: `accelserve bench backends|scheduler` runs them as modules (`python -m benchmarks.<name>`)."""
