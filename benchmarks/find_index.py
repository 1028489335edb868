"""Benchmark: ``omnifs find`` over an index of 10,000 files (target: under 200 ms).

Builds a metadata index like a mount would (``omnifs/metaindex.py``) in a
temporary cache directory, then times typical queries in-process and the whole
``omnifs find`` command (process start included).  Not a test: run it with

    python -m benchmarks.find_index [--files N] [--runs R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omnifs import meta
from omnifs.metaindex import INDEX_FILE, MetaIndex

QUERIES: list[dict[str, object]] = [
    {"tags": ["project-7"]},
    {"tags": ["draft"], "where": {"author": "alice"}},
    {"name": "*-42*.yaml"},
    {"where": {"custom.priority": "3"}},
]


def build(path: Path, files: int) -> float:
    index = MetaIndex(path)
    started = time.perf_counter()
    for i in range(files):
        name = f"file-{i}.yaml"
        user = meta.UserMeta(
            tags=(f"project-{i % 50}", "draft" if i % 3 == 0 else "final"),
            author=("alice", "bob", "carol")[i % 3],
            description=f"document {i}",
            custom={"priority": i % 5},
        )
        doc = meta.document(meta.SystemFields(name, i, 1_700_000_000 * 10**9, None, None), user)
        index.put(f"dir-{i % 100}/{name}", doc)
    index.close()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="omnifs-find-bench-") as tmp:
        cache = Path(tmp) / "cache" / "omnifs" / "bench"  # cache_home() / <remote>
        took = build(cache / INDEX_FILE, args.files)
        print(f"indexed {args.files} files in {took:.2f} s")
        (cache / "data").mkdir()  # looks like a remote's cache directory to `omnifs find`
        index = MetaIndex(cache / INDEX_FILE, readonly=True)
        for q in QUERIES:
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                hits = index.find(**q)  # type: ignore[arg-type]
                times.append(time.perf_counter() - t0)
            print(f"in-process {q}: {len(hits)} hits, median {statistics.median(times) * 1000:.1f} ms")
        index.close()
        env = dict(os.environ, XDG_CACHE_HOME=str(Path(tmp) / "cache"), XDG_CONFIG_HOME=str(Path(tmp) / "config"))
        cmd = [sys.executable, "-m", "omnifs", "find", "bench:", "--tag", "project-7", "--where", "author=alice"]
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            times.append(time.perf_counter() - t0)
        hits = len(out.stdout.split())
        median = statistics.median(times) * 1000
        print(f"omnifs find (whole command, process start included): {hits} hits, median {median:.0f} ms")
        if out.returncode:
            print(f"  exit code {out.returncode}: {out.stderr.strip()[:200]}")


if __name__ == "__main__":
    main()
