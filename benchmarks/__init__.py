"""Benchmarks, run as `python -m benchmarks.NAME`: each prints its figures against a baseline
measured in the same run."""
