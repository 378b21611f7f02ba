"""Helpers for tests and benchmarks: local multi-process runs and operation counts."""
