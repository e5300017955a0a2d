"""Benchmark scripts and the library code they share (run from the repository root)."""
