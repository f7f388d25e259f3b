"""Benchmarks of creditgate (BENCHMARKS.md); run them as scripts: python bench/run_all.py."""
