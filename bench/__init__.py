"""Benchmarks of aiayn against peers of the same architecture and size (see docs/performance.md).

Run from the repository root as modules, e.g. ``python -m bench.train_throughput --help``.
"""
