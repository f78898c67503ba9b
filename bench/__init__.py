"""Benchmarks (not tests): each script measures side by side in one run and prints ratios.

Run one with ``.venv/bin/python -m bench.<name>``, or all with ``make bench``. Every
script uses loopback only, bounds itself in time, prints a table and writes
``bench/results/<name>.json``.
"""
