"""kill -9 at random points with uploads pending: every file whose close() returned survives.

The slow set's loop of 50 trials (``-m slow`` selects it; the default run does it too).
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mount.conftest import Remote, make_remote
from tests.mount.harness import REPO

TRIALS = 50

WRITER = r"""
import hashlib, os, sys
root = sys.argv[1]
dev = os.stat(root).st_dev  # the mount's device: once it changes, the mount is gone
if dev == os.stat(os.path.dirname(root)).st_dev:
    sys.exit(0)  # started after the kill: root is already the plain directory below
i = 0
while True:
    name = f"t{sys.argv[2]}-{i:04d}.bin"
    data = hashlib.sha256(name.encode()).digest() * (1 + i % 40) * 64
    try:
        with open(os.path.join(root, name), "wb") as f:
            on_mount = os.fstat(f.fileno()).st_dev == dev
            f.write(data)
    except OSError:
        break
    if not on_mount:
        break  # auto_unmount removed the dead mount: this landed in the plain directory below
    print(name, flush=True)  # printed only after close() returned on the mount
    i += 1
"""


def expected(name: str) -> bytes:
    i = int(name.rsplit("-", 1)[1].split(".")[0])
    return hashlib.sha256(name.encode()).digest() * (1 + i % 40) * 64


@pytest.mark.slow
def test_kill_9_at_random_points_loses_no_closed_file(
    request: pytest.FixtureRequest, tmp_path: Path, home: Path, mounter
) -> None:
    remote: Remote = make_remote("local", request, tmp_path, home)
    assert remote.backend_root is not None
    rnd = random.Random(7)
    closed: list[str] = []
    for trial in range(TRIALS):
        m = mounter(remote, "write_back=30s")  # nothing gets uploaded before the kill
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(m.path), str(trial)], stdout=subprocess.PIPE, text=True, cwd=REPO
        )
        time.sleep(rnd.uniform(0.05, 0.6))
        m.kill()  # SIGKILL, then a lazy unmount of what the crash left
        try:
            out, _ = writer.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            writer.kill()
            out, _ = writer.communicate()
        closed += out.split()
    # One more mount recovers every pending upload; flush pushes them now.
    m = mounter(remote)
    res = subprocess.run(
        [sys.executable, "-m", "omnifs", "flush", str(m.path), "--wait", "--timeout", "120", "-q"],
        env=remote.env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    assert len(closed) > TRIALS  # the loop really wrote files
    missing = [n for n in closed if (remote.backend_root / n).read_bytes() != expected(n)]
    assert missing == [], f"{len(missing)} closed file(s) lost or wrong, e.g. {missing[:5]}"
    # Nothing is left pending either, and the mount shows the same content.
    assert int(os.getxattr(m.path, "user.omnifs.pending")) == 0
    for name in rnd.sample(closed, min(20, len(closed))):
        assert (m.path / name).read_bytes() == expected(name)
