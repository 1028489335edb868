"""An fsx-style randomized check: random operations on files compared to an in-memory model."""

from __future__ import annotations

import mmap
import os
import random

import pytest

MAX_SIZE = 256 * 1024


def _check(fd: int, model: bytearray, where: str) -> None:
    assert os.fstat(fd).st_size == len(model), f"{where}: size {os.fstat(fd).st_size} != {len(model)}"
    data = os.pread(fd, len(model) + 10, 0)
    if data != bytes(model):
        first = next(i for i in range(min(len(data), len(model))) if data[i] != model[i]) if data else 0
        raise AssertionError(f"{where}: content differs (lengths {len(data)}/{len(model)}, first at {first})")


@pytest.mark.parametrize("writeback", ["true", "false"])
def test_random_operations_match_model(remote, mounter, writeback: str) -> None:
    mnt = mounter(remote, f"writeback_cache={writeback}")
    rnd = random.Random(20261121)
    path = mnt.path / "fsx.bin"
    model = bytearray()
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
    try:
        for step in range(1200):
            op = rnd.choices(
                ["write", "read", "truncate", "reopen", "fsync", "mapread", "mapwrite", "append"],
                weights=[30, 25, 10, 6, 4, 8, 8, 9],
            )[0]
            where = f"step {step} ({op})"
            if op == "write":
                off = rnd.randrange(0, MAX_SIZE)
                data = rnd.randbytes(rnd.randrange(1, 20_000))
                os.pwrite(fd, data, off)
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off : off + len(data)] = data
            elif op == "append":
                data = rnd.randbytes(rnd.randrange(1, 5000))
                afd = os.open(path, os.O_WRONLY | os.O_APPEND)
                os.write(afd, data)
                os.close(afd)
                model.extend(data)
            elif op == "read":
                off = rnd.randrange(0, MAX_SIZE)
                n = rnd.randrange(1, 70_000)
                assert os.pread(fd, n, off) == bytes(model[off : off + n]), where
            elif op == "truncate":
                size = rnd.randrange(0, MAX_SIZE)
                os.ftruncate(fd, size)
                if size > len(model):
                    model.extend(bytes(size - len(model)))
                else:
                    del model[size:]
            elif op == "reopen":
                os.close(fd)
                _check(fd := os.open(path, os.O_RDWR), model, where)
            elif op == "fsync":
                os.fsync(fd)
            elif op in ("mapread", "mapwrite") and len(model) > 0:
                with mmap.mmap(fd, len(model)) as mm:
                    off = rnd.randrange(0, len(model))
                    n = min(rnd.randrange(1, 10_000), len(model) - off)
                    if op == "mapread":
                        assert mm[off : off + n] == bytes(model[off : off + n]), where
                    else:
                        data = rnd.randbytes(n)
                        mm[off : off + n] = data
                        model[off : off + n] = data
                        mm.flush()
        _check(fd, model, "end")
    finally:
        os.close(fd)
    # A fresh open after close sees exactly the model.
    assert path.read_bytes() == bytes(model)
