"""Benchmarks: offline (engine in-process, plus transformers' assisted generation) and serving (HTTP)."""
