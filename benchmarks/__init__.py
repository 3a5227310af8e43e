"""Benchmarks for saematch (run with ``python -m benchmarks.run``)."""
