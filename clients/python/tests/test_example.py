"""The README's example (examples/quickstart.py) runs against a real server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sbserver import Server

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_the_quickstart_example_runs(server: Server, channel: str) -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), server.url, channel],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "I am client-" in out.stdout
    assert "published at offset 1" in out.stdout
    assert f"{channel} #1 from client-" in out.stdout
