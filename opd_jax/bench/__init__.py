"""Benchmark scripts: each prints a number as its last line; never part of the tests."""
