"""Backend registry: config ``type`` names mapped lazily to implementation classes.

Optional SDKs (boto3, paramiko) are imported only when their backend is used.
"""

from __future__ import annotations

import importlib

from omnifs.backends.base import Backend

_REGISTRY: dict[str, str] = {
    "failover": "omnifs.backends.failover:FailoverBackend",
    "local": "omnifs.backends.local:LocalBackend",
    "memory": "omnifs.backends.memory:MemoryBackend",
    "mirror": "omnifs.backends.mirror:MirrorBackend",
    "s3": "omnifs.backends.s3:S3Backend",
    "sftp": "omnifs.backends.sftp:SFTPBackend",
}


def backend_types() -> list[str]:
    return sorted(_REGISTRY)


def backend_class(type_name: str) -> type[Backend]:
    """Return the class registered for ``type_name``; KeyError if unknown."""
    module, _, cls = _REGISTRY[type_name].partition(":")
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]
