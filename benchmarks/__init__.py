"""The jit benchmark harness: `python -m benchmarks [--quick] [--only PATTERN] [--out DIR]`."""
