"""The companion wrapper passes the backend conformance suite (companions hidden from listings).

Wrapping must not change anything for ordinary files: writes, renames,
deletes and listings behave as the inner backend's.
"""

from __future__ import annotations

import pytest

from omnifs.backends.memory import MemoryBackend
from omnifs.backends.metafiles import MetaBackend
from tests.backends.conformance import BackendConformance


class TestMetaBackendOverMemory(BackendConformance):
    @pytest.fixture
    def backend_factory(self):
        return lambda: MetaBackend(MemoryBackend("mem"), show=False)


class TestMetaBackendOverLocal(BackendConformance):
    """Over a local directory (sidecar files): ordinary files are unaffected."""

    @pytest.fixture
    def backend_factory(self, tmp_path):
        from omnifs.backends.local import LocalBackend

        root = tmp_path / "root"
        root.mkdir()
        return lambda: MetaBackend(LocalBackend("local", str(root)), show=False)
