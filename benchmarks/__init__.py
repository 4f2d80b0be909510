"""Pieces of benchmark.py: the reference system's way of working, this project's pipelines as the benchmark
drives them, side-by-side timing, tables, and the reconstruction-quality comparison."""
