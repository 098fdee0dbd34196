"""Registers the test-bed fixtures (tests/testbed/fixtures.py) for these tests, unless the root
conftest already did (`pytest_plugins = ["tests.testbed.fixtures"]`): one plugin, one test bed."""
from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("tests.testbed.fixtures"):
        config.pluginmanager.import_plugin("tests.testbed.fixtures")
