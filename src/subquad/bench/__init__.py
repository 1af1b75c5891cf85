"""Benchmarks: timing, memory and FLOP harness (``subquad bench ...``)."""
