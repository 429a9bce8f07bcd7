"""Benchmarks of DCAL against its SA baseline: `python -m benchmarks.run` (see run.py).

Not part of the test suite (tests/test_benchmarks_smoke.py only checks that the harness runs on a tiny
configuration). Every ratio is measured A/B alternating in one process: medians and interquartile ranges
over pairs, so that a slow phase of a shared machine hits both sides.
"""
