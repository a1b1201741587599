"""Benchmarks: each stage against the bare library loop it wraps, and how cost grows with the datastore."""
