"""Benchmark runner for omnifs (``scripts/bench``); see docs/benchmarks.md.

Modules: ``servers`` (loopback S3 and sshd), ``stores`` (direct access to each
backend), ``mounts`` (how each tool mounts), ``configs`` (the data-driven list
of configurations), ``workload`` (the measured steps), ``profiling`` (py-spy),
``report`` (statistics, tables, docs/benchmarks.md) and ``runner`` (CLI).
"""
