"""Benchmarks: medrelay beside a bare relay, measured in the same run (docs/performance.md).

Entry point: ``python -m bench [--quick]`` (``make bench ARGS=--quick``).
"""
