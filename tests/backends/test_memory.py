from __future__ import annotations

import pytest

from omnifs.backends.memory import MemoryBackend
from tests.backends.conformance import BackendConformance


class TestMemoryBackend(BackendConformance):
    @pytest.fixture
    def backend_factory(self):
        return lambda: MemoryBackend("mem")
