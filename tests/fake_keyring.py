"""A keyring backend for tests that must not need D-Bus (the real Secret Service is tested elsewhere).

``FileKeyring`` keeps entries in the JSON file named by ``$OMNIFS_TEST_FAKE_KEYRING``
so that subprocesses share it (select it with
``PYTHON_KEYRING_BACKEND=tests.fake_keyring.FileKeyring``).  Writing ``LOCKED`` into
that file makes every call raise ``KeyringLocked``.  The backend is viable only
while the variable is set, so it is never picked by keyring's auto-detection.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jaraco.classes import properties
from keyring.backend import KeyringBackend
from keyring.errors import KeyringLocked, PasswordDeleteError

ENV = "OMNIFS_TEST_FAKE_KEYRING"
BACKEND = "tests.fake_keyring.FileKeyring"


class FileKeyring(KeyringBackend):
    """Entries in a JSON file: {"service\\0username": password}."""

    @properties.classproperty
    def priority(cls) -> float:
        if not os.environ.get(ENV):
            raise RuntimeError(f"${ENV} is not set")
        return 0.1

    @staticmethod
    def _path() -> Path:
        return Path(os.environ[ENV])

    def _load(self) -> dict[str, str]:
        path = self._path()
        if not path.exists():
            return {}
        text = path.read_text()
        if text.strip() == "LOCKED":
            raise KeyringLocked("the fake keyring is locked")
        return json.loads(text) if text.strip() else {}

    def _save(self, data: dict[str, str]) -> None:
        self._path().write_text(json.dumps(data))

    def get_password(self, service: str, username: str) -> str | None:
        return self._load().get(f"{service}\0{username}")

    def set_password(self, service: str, username: str, password: str) -> None:
        data = self._load()
        data[f"{service}\0{username}"] = password
        self._save(data)

    def delete_password(self, service: str, username: str) -> None:
        data = self._load()
        if data.pop(f"{service}\0{username}", None) is None:
            raise PasswordDeleteError("no such password")
        self._save(data)
