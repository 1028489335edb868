"""Shared test configuration; server fixtures live in their own plugin modules."""

from __future__ import annotations

pytest_plugins = ["tests.fixtures_s3", "tests.fixtures_sftp"]
