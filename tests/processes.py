"""Processes the tests start for real (servers, workers): free ports, health waits, and stopping them by pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Stop a process we started, and its children, by its pid (it leads its own session)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, seconds: int = 120) -> None:
    """Wait until a Prefect API answers `<url>/health`; fail with the server's log if it dies or stalls."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, Path(log).read_text()[-3000:]
        assert time.monotonic() < deadline, f"prefect server did not become healthy in {seconds} s"
        time.sleep(0.5)
