"""Chart tests run against the test bed (tests/testbed/fixtures.py) and reuse the e2e helpers
for storage credentials and subject photos."""
from __future__ import annotations

import pytest

from tests.e2e.conftest import minio_client, subject  # noqa: F401  (fixtures, shared with e2e)


def pytest_configure(config: pytest.Config) -> None:
    # The test-bed fixtures, unless the root conftest already registered them.
    if not config.pluginmanager.has_plugin("tests.testbed.fixtures"):
        config.pluginmanager.import_plugin("tests.testbed.fixtures")
