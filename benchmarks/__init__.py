"""Speed and memory measurements, as ratios within one run: python -m benchmarks.NAME."""
