"""Test support: the real Switchboard binary (and a private redis-server) on free ports.

The binary is ``$SWITCHBOARD_BIN``; without it, ``debug/switchboard`` in the target dir
``cargo metadata`` reports, built with ``cargo build --bin switchboard`` when missing.
Every process started here is killed by the fixture that started it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_binary() -> Path:
    from_env = os.environ.get("SWITCHBOARD_BIN")
    if from_env:
        return Path(from_env).resolve()
    meta = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    binary = Path(json.loads(meta.stdout)["target_directory"]) / "debug" / "switchboard"
    if not binary.exists():
        subprocess.run(["cargo", "build", "--bin", "switchboard"], cwd=REPO, check=True)
    return binary


class Server:
    """One switchboard process on 127.0.0.1."""

    def __init__(self, args: list[str], port: int | None = None) -> None:
        self.args = args
        self.port = port if port is not None else free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="switchboard-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        deadline = time.monotonic() + timeout
        while True:
            self.proc = subprocess.Popen(
                [str(server_binary()), "--host", "127.0.0.1", "--port", str(self.port), *self.args],
                stdout=self.log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            if self._wait_ready(deadline):
                return
            self.kill()
            # The port of a restart may still be held for a moment: try again.
            busy = "in use" in self.output()
            if not busy or time.monotonic() > deadline:
                raise RuntimeError(f"switchboard not ready on {self.port}:\n{self.output()}")
            time.sleep(0.2)

    def _wait_ready(self, deadline: float) -> bool:
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.http_url}/readyz", timeout=1) as res:
                    if res.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return False

    def metrics(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.http_url}/metrics", timeout=5) as res:
            data: dict[str, Any] = json.load(res)
            return data

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL: a crash, no close frames."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the process freezes, its TCP connections stay up (a dead peer)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Kill the process if it runs, and remove its log."""
        self.resume()
        self.kill()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)

    def stop(self) -> None:
        """SIGTERM (the server drains), SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class PrivateRedis:
    """A ``redis-server`` without persistence, on a free port, owned by one test."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError("redis-server did not start (install it with `apt-get install redis-server`)")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
