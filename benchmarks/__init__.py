"""Benchmarks for memsave; the shared harness lives in benchmarks.harness."""
