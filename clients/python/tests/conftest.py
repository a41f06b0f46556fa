"""Fixtures: one shared memory-bus server for the API tests, unique channel names."""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from collections.abc import Iterator

import pytest

from sbserver import Server

CONFIG = """\
ack_timeout = "300ms"
rate_limit = 0.0

[namespaces.orders]
acked = true
history_size = 1000

[namespaces.quiet]
history_size = 0
presence = false
join_leave = false

[namespaces.readonly]
client_publish = false
"""

_names = itertools.count(1)


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="sb-py-") as tmp:
        config = os.path.join(tmp, "switchboard.toml")
        with open(config, "w") as f:
            f.write(CONFIG)
        srv = Server(["--config", config])
        try:
            yield srv
        finally:
            srv.stop()
            srv.close()


@pytest.fixture
def channel() -> str:
    """A channel name no other test (or engineer) uses: chat:py-<time>-<n>."""
    return f"chat:py-{time.time_ns()}-{next(_names)}"
