"""diffrl benchmarks (not tests): ``python -m bench.run``; see bench/README.md."""
