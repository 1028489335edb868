"""Command line of ``scripts/bench``: start servers, run interleaved passes, report, clean up."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import FrameType

from benchmarks import configs as cf
from benchmarks.mounts import REPO, Unsupported, lazy_unmount, mounted_fstype
from benchmarks.profiling import PySpyProfiler, find_py_spy
from benchmarks.report import RunData, machine, render, versions, write_doc
from benchmarks.servers import S3Server, SSHServer
from benchmarks.stores import LocalStore, S3Store, Store
from benchmarks.workload import QUICK, MiB, PassResult, Sizes, Workload, blueprint_files

log = logging.getLogger("bench")

DEFAULT_OUT = REPO / "docs" / "benchmarks.md"
RAW_JSON = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "omnifs-bench" / "last-run.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    names = ", ".join(c.name for c in cf.CONFIGS)
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark omnifs against a plain local directory, rclone, s3fs and sshfs on loopback servers.",
        epilog=f"Configurations: {names}.",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, 1 pass, fio 3 s (a smoke test of a few minutes)")
    p.add_argument("--passes", type=int, help="interleaved passes (default 3; 1 with --quick)")
    p.add_argument("--only", help="comma-separated configurations to run (the local baseline always runs)")
    p.add_argument(
        "--out",
        type=Path,
        help=f"markdown file to write (default {DEFAULT_OUT.relative_to(REPO)}; "
        "with --quick nothing is written unless --out is given)",
    )
    p.add_argument("--big-mib", type=int, help="size of the sequential file in MiB (default 256)")
    p.add_argument("--entries", type=int, help="entries in the listing directory (default 10000)")
    p.add_argument("--fio-seconds", type=int, help="duration of the random-read test (default 20)")
    p.add_argument(
        "--profile",
        metavar="CONFIG",
        default="omnifs-s3",
        help="configuration to profile with py-spy in one extra pass (default omnifs-s3)",
    )
    p.add_argument("--no-profile", action="store_true", help="skip the profiling pass")
    p.add_argument(
        "--s3-server",
        choices=("s3rver", "moto"),
        default="s3rver",
        help="loopback S3 server (s3rver falls back to moto when node/s3rver are missing)",
    )
    p.add_argument(
        "--omnifs-rev",
        metavar="REV",
        help="benchmark omnifs as committed at git REV (exported with git archive) instead of the working tree",
    )
    p.add_argument("--step-timeout", type=float, help="seconds after which a step is stopped (default 300)")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a new one under /var/tmp, removed)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def sizes_from(args: argparse.Namespace) -> Sizes:
    """The step sizes chosen by --quick and the explicit size options."""
    base = QUICK if args.quick else Sizes()
    changes = {
        k: v
        for k, v in {
            "big_mib": args.big_mib,
            "entries": args.entries,
            "fio_seconds": args.fio_seconds,
            "step_timeout": args.step_timeout,
        }.items()
        if v is not None
    }
    return dataclasses.replace(base, **changes)


class Interrupted(BaseException):
    """SIGTERM received."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"signal {signum}")


def _search_cmd(listing: Path) -> list[str]:
    return ["find", str(listing), "-name", "workflow-0042*"]


class Bench:
    """One benchmark run: owns the servers, the scratch directory and the results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = sizes_from(args)
        self.passes = args.passes or (1 if args.quick else 3)
        self.own_workdir = args.workdir is None
        self.workdir: Path = args.workdir or Path(tempfile.mkdtemp(prefix="omnifs-bench-", dir="/var/tmp"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.s3: S3Server | None = None
        self.sshd: SSHServer | None = None
        self.configs = self._select()
        # Resolved once: the exported tree and the reported commit stay the same if HEAD moves during the run.
        self.omnifs_rev: str | None = None
        if args.omnifs_rev:
            self.omnifs_rev = subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--verify", f"{args.omnifs_rev}^{{commit}}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        self.data = RunData(self.sizes, self.passes, cf.BASELINE, [c.name for c in self.configs])
        self.data.descriptions = {c.name: c.describe() for c in self.configs}
        self.data.command = "scripts/bench " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "scripts/bench"

    def _select(self) -> list[cf.Config]:
        wanted = None
        if self.args.only:
            wanted = {n.strip() for n in self.args.only.split(",") if n.strip()}
            unknown = wanted - {c.name for c in cf.CONFIGS}
            if unknown:
                raise SystemExit(f"scripts/bench: unknown configuration(s): {', '.join(sorted(unknown))}")
        return [c for c in cf.CONFIGS if c.name == cf.BASELINE or wanted is None or c.name in wanted]

    def start_backends(self) -> cf.Backends:
        """Start the servers the selected configurations need and describe the backends."""
        kinds = {c.backend for c in self.configs if cf.tool_missing(c.tool) is None}
        if "s3" in kinds:
            try:
                self.s3 = S3Server(self.workdir / "s3", prefer=self.args.s3_server)
                (self.workdir / "s3").mkdir(exist_ok=True)
                self.s3.start()
                log.info("S3 server: %s on %s", self.s3.version(), self.s3.endpoint_url)
            except Exception as exc:
                log.warning("no S3 server: %s", exc)
                self.data.notes.append(f"S3 server failed to start: {exc}")
                self.s3 = None
        if "sftp" in kinds and SSHServer.available():
            self.sshd = SSHServer(self.workdir / "sshd")
            self.sshd.start()
            log.info("sshd on 127.0.0.1:%d", self.sshd.port)
        b = cf.Backends(
            workdir=self.workdir,
            local_root=self.workdir / "local-backend",
            s3=self.s3,
            bucket=f"omnifs-bench-{uuid.uuid4().hex[:8]}",
            sshd=self.sshd,
            sftp_root=self.workdir / "sftp-backend",
        )
        if self.omnifs_rev:
            b.omnifs_src = self.export_omnifs(self.omnifs_rev)
        b.write_client_files()
        return b

    def export_omnifs(self, rev: str) -> Path:
        """Extract omnifs/ as committed at ``rev`` into the scratch directory (git archive: read-only)."""
        dest = self.workdir / "omnifs-src"
        dest.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", rev, "omnifs"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return dest

    def stores(self, b: cf.Backends) -> dict[str, Store]:
        """Direct access to each running backend."""
        out: dict[str, Store] = {"local": LocalStore(b.local_root)}
        if self.s3 is not None:
            out["s3"] = S3Store(self.s3.client(), b.bucket, self.workdir)
        if self.sshd is not None:
            out["sftp"] = LocalStore(b.sftp_root, "sftp")
        return out

    def run(self) -> int:
        """Run everything; return the exit code."""
        t_start = time.perf_counter()
        b = self.start_backends()
        stores = self.stores(b)
        active: list[cf.Config] = []
        for c in self.configs:
            why = cf.tool_missing(c.tool) or b.available(c.backend)
            if why:
                self.data.skipped[c.name] = why
                log.warning("skipping %s: %s", c.name, why)
            else:
                active.append(c)
        self.data.versions = versions(REPO, self.s3.version() if self.s3 else None, self.omnifs_rev)
        listing = big = ""
        big_data = os.urandom(self.sizes.big_mib * MiB)
        for p in range(self.passes):
            listing, big = f"list-p{p + 1}", f"data-p{p + 1}/big.bin"
            for kind, store in stores.items():
                t = time.perf_counter()
                store.populate(listing, blueprint_files(self.sizes.entries))
                store.put_file(big, big_data)
                log.info(
                    "pass %d: created %d entries and a %d MiB file on %s in %.1fs",
                    p + 1,
                    self.sizes.entries,
                    self.sizes.big_mib,
                    kind,
                    time.perf_counter() - t,
                )
            others = [c for c in active if c.name != cf.BASELINE]
            k = p % len(others) if others else 0
            order = [c for c in active if c.name == cf.BASELINE] + others[k:] + others[:k]
            for c in order:
                if c.name in self.data.skipped:
                    continue
                res = self.run_one(c, b, stores[c.backend], listing, big, f"p{p + 1}")
                if res is not None:
                    self.data.results.setdefault(c.name, [PassResult() for _ in range(p)]).append(res)
        del big_data
        if not self.args.no_profile:
            self.profile(active, b, stores, listing, big)
        self.data.duration_s = time.perf_counter() - t_start
        return self.report()

    def run_one(
        self, c: cf.Config, b: cf.Backends, store: Store, listing: str, big: str, tag: str
    ) -> PassResult | None:
        """One configuration, one pass; None when the configuration turned out unsupported."""
        work = f"work-{c.name}-{tag}"
        log.info("running %s (%s)", c.name, work)
        t = time.perf_counter()
        wl = Workload(
            c.name, cf.mount_factory(c, b, tag=tag), store, self.sizes, listing, work, _search_cmd, backend_big=big
        )
        try:
            res = wl.run()
        except Unsupported as exc:
            self.data.skipped[c.name] = f"option refused by the tool: {exc}"
            self.data.results.pop(c.name, None)
            log.warning("skipping %s: %s", c.name, exc)
            return None
        except (KeyboardInterrupt, Interrupted):
            raise
        except Exception as exc:
            log.error("%s failed: %s", c.name, exc)
            res = wl.result
            res.notes.append(f"pass aborted: {type(exc).__name__}: {str(exc)[:300]}")
        finally:
            store.remove_tree(work)
            for d in cf.private_dirs(c, b, tag):
                shutil.rmtree(d, ignore_errors=True)
        for n in res.notes:
            self.data.notes.append(f"`{c.name}` {work}: {n}")
        log.info("%s done in %.1fs", c.name, time.perf_counter() - t)
        return res

    def profile(
        self, active: list[cf.Config], b: cf.Backends, stores: dict[str, Store], listing: str, big: str
    ) -> None:
        """One extra pass of the chosen omnifs configuration under py-spy."""
        py_spy = find_py_spy()
        c = next((c for c in active if c.name == self.args.profile and c.name not in self.data.skipped), None)
        if py_spy is None or c is None:
            why = "py-spy not installed" if py_spy is None else f"{self.args.profile} did not run"
            self.data.notes.append(f"no profile: {why}")
            return
        prof = PySpyProfiler(py_spy, self.workdir / "profile")
        wl = Workload(
            c.name,
            cf.mount_factory(c, b, counts_file=prof.counts_file, tag="profile"),
            stores[c.backend],
            self.sizes,
            listing,
            f"work-{c.name}-profile",
            _search_cmd,
            backend_big=big,
            profiler=prof,
        )
        log.info("profiling %s with py-spy", c.name)
        try:
            wl.run()
        except Exception as exc:
            self.data.notes.append(f"profile pass failed: {exc}")
        finally:
            stores[c.backend].remove_tree(f"work-{c.name}-profile")
            for d in cf.private_dirs(c, b, "profile"):
                shutil.rmtree(d, ignore_errors=True)
        self.data.profile_md = prof.markdown(c.name)
        keep = RAW_JSON.parent / "profile"
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(prof.outdir, keep)

    def report(self) -> int:
        """Print the tables, write the markdown file and the raw JSON."""
        text = render(self.data, machine())
        print(text)
        out = self.args.out or (None if self.args.quick else DEFAULT_OUT)
        if out is not None:
            write_doc(out, text)
            log.info("wrote %s", out)
        RAW_JSON.parent.mkdir(parents=True, exist_ok=True)
        raw = {c: [dataclasses.asdict(r) for r in rs] for c, rs in self.data.results.items()}
        RAW_JSON.write_text(
            json.dumps(
                {"sizes": dataclasses.asdict(self.sizes), "results": raw, "skipped": self.data.skipped}, indent=1
            )
        )
        log.info("raw numbers in %s", RAW_JSON)
        return 0 if self.data.results.get(cf.BASELINE) else 1

    def cleanup(self) -> None:
        """Unmount anything left under the scratch directory, stop the servers, keep the logs, remove scratch data."""
        mnt = self.workdir / "mnt"
        if mnt.is_dir():
            for d in mnt.iterdir():
                lazy_unmount(d)
        if self.s3 is not None:
            self.s3.stop()
        if self.sshd is not None:
            self.sshd.stop()
        logs = self.workdir / "logs"
        if logs.is_dir():
            keep = RAW_JSON.parent / "logs"
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(logs, keep)
        if self.own_workdir:
            still = [d for d in (mnt.iterdir() if mnt.is_dir() else []) if mounted_fstype(d)]
            if still:
                log.error("not removing %s: still mounted: %s", self.workdir, still)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit code 0 when the baseline ran."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if shutil.which("fusermount3") is None or not os.path.exists("/dev/fuse"):
        print("scripts/bench: FUSE is not available (fusermount3 or /dev/fuse missing)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    bench = Bench(args)
    try:
        return bench.run()
    except (KeyboardInterrupt, Interrupted):
        print("scripts/bench: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        bench.cleanup()
        subprocess.run(["sync"], check=False)
