"""Benchmarks and GPU checks, run from the repository root as modules: ``python -m bench.<name> [--smoke]``.

Each prints one JSON object (and keeps it under ``$OUT`` on the device machine); ``--smoke`` runs the same code paths
on CPU with tiny shapes, which is what ``tests/test_bench_smoke.py`` runs. Figures are in ``docs/benchmarks.md``.
"""
