"""Benchmark: ``omnifs find`` over an index of 10,000 files (target: under 200 ms).

Builds a metadata index like a mount would (``omnifs/metaindex.py``) in a
temporary cache directory, then times typical queries in-process and the whole
``omnifs find`` command, process start to exit, run both as ``python -m
omnifs`` and as the installed ``omnifs`` console script.  Each command runs
with a bytecode cache (as after ``pip install``) and without one (every omnifs
module compiled from source, as under ``PYTHONDONTWRITEBYTECODE=1``).  Not a
test: run it with

    python -m benchmarks.find_index [--files N] [--runs R] [--code DIR]

``--code`` times another checkout's ``omnifs`` (e.g. an older commit unpacked
with ``git archive``) against the same index.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omnifs import meta
from omnifs.metaindex import INDEX_FILE, MetaIndex

REPO = Path(__file__).resolve().parent.parent

QUERIES: list[dict[str, object]] = [
    {"tags": ["project-7"]},
    {"tags": ["draft"], "where": {"author": "alice"}},
    {"name": "*-42*.yaml"},
    {"where": {"custom.priority": "3"}},
]

# Whole-command cases: (label, arguments after `omnifs find`).
COMMANDS: list[tuple[str, list[str]]] = [
    ("one name", ["bench:", "--name", "file-42.yaml"]),
    ("tag+author", ["bench:", "--tag", "project-7", "--where", "author=alice"]),
    ("tag+author, 1/3", ["bench:", "--tag", "draft", "--where", "author=alice"]),
    ("tag+author, 1/3 --json", ["bench:", "--tag", "draft", "--where", "author=alice", "--json"]),
    ("custom field --json", ["bench:", "--where", "priority=3", "--json"]),
    ("every remote, glob", ["--name", "*-42*.yaml"]),
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


def run_once(cmd: list[str], env: dict[str, str], cwd: str) -> tuple[float, float, int, str]:
    """Run ``cmd``; return (wall seconds, CPU seconds of the child, exit code, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if out.returncode:
        print(f"  exit code {out.returncode}: {out.stderr.strip()[:200]}")
    return wall, cpu, out.returncode, out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--code", type=Path, default=REPO, help="Checkout whose omnifs the commands import.")
    args = parser.parse_args()
    script = Path(sys.executable).parent / "omnifs"
    runners = [("python -m omnifs", [sys.executable, "-m", "omnifs"])]
    if script.exists():
        runners.append(("omnifs script", [str(script)]))
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

        base = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "XDG_", "OMNIFS_"))}
        base.update(
            PYTHONPATH=str(args.code.resolve()),  # the checkout under test, not whatever is installed
            XDG_CACHE_HOME=str(Path(tmp) / "cache"),
            XDG_CONFIG_HOME=str(Path(tmp) / "config"),
            XDG_STATE_HOME=str(Path(tmp) / "state"),
        )
        modes = {
            "cached": dict(base, PYTHONPYCACHEPREFIX=str(Path(tmp) / "pycache")),
            "no cache": dict(base, PYTHONDONTWRITEBYTECODE="1"),
        }
        print(f"\nomnifs find, process start to exit ({args.code}), median of {args.runs} runs, milliseconds:")
        print(f"{'case':<24}{'hits':>6}  {'runner':<17}{'bytecode':<10}{'wall':>7}{'min':>7}{'cpu':>7}")
        for label, find_args in COMMANDS:
            for runner, prefix in runners:
                for mode, env in modes.items():
                    cmd = [*prefix, "find", *find_args]
                    run_once(cmd, env, tmp)  # warm-up (writes the bytecode cache in "cached" mode)
                    runs = [run_once(cmd, env, tmp) for _ in range(args.runs)]
                    walls = [r[0] * 1000 for r in runs]
                    cpu = statistics.median(r[1] * 1000 for r in runs)
                    out = runs[-1][3]
                    hits = len(out.split()) if "--json" not in find_args else out.count('"location"')
                    print(
                        f"{label:<24}{hits:>6}  {runner:<17}{mode:<10}"
                        f"{statistics.median(walls):>7.0f}{min(walls):>7.0f}{cpu:>7.0f}"
                    )


if __name__ == "__main__":
    main()
