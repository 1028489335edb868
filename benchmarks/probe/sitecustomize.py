"""Count the backend requests of a mount process (profiling pass only).

Put this directory on PYTHONPATH and set OMNIFS_BENCH_COUNTS to a file: every
S3 API call (botocore) and SFTP request (paramiko) is counted by name and the
totals are written to that file as JSON ten times a second. Nothing else changes.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from typing import Any

_counts: collections.Counter[str] = collections.Counter()
_lock = threading.Lock()


def _count(name: str) -> None:
    with _lock:
        _counts[name] += 1


def _patch_botocore() -> None:
    try:
        import botocore.client
    except ImportError:
        return
    orig = botocore.client.BaseClient._make_api_call

    def counted(self: Any, operation_name: str, api_params: Any) -> Any:
        _count(f"S3 {operation_name}")
        return orig(self, operation_name, api_params)

    botocore.client.BaseClient._make_api_call = counted  # type: ignore[method-assign]


def _patch_paramiko() -> None:
    try:
        from paramiko import sftp, sftp_client
    except ImportError:
        return
    orig_req = sftp_client.SFTPClient._request
    orig_async = sftp_client.SFTPClient._async_request

    def request(self: Any, t: int, *args: Any) -> Any:
        _count(f"SFTP {sftp.CMD_NAMES.get(t, t)}")
        return orig_req(self, t, *args)

    def async_request(self: Any, fileobj: Any, t: int, *args: Any) -> Any:
        _count(f"SFTP {sftp.CMD_NAMES.get(t, t)}")
        return orig_async(self, fileobj, t, *args)

    sftp_client.SFTPClient._request = request  # type: ignore[method-assign]
    sftp_client.SFTPClient._async_request = async_request  # type: ignore[method-assign]


def _writer(path: str) -> None:
    tmp = f"{path}.tmp"
    while True:
        with _lock:
            data = json.dumps(dict(_counts))
        with open(tmp, "w") as f:
            f.write(data)
        os.replace(tmp, path)
        time.sleep(0.1)


_target = os.environ.get("OMNIFS_BENCH_COUNTS")
if _target:
    _patch_botocore()
    _patch_paramiko()
    threading.Thread(target=_writer, args=(_target,), daemon=True, name="bench-counts").start()
