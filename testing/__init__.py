"""Harnesses for the tests and benchmarks, never installed: a docker daemon of their own."""
