"""A real ``fitmap serve`` process on 127.0.0.1 for the tests: started with the given arguments,
waited for until ``/health`` answers, stopped after."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(args: list[str], port: int, drop_env: tuple[str, ...] = ()) -> Iterator[subprocess.Popen]:
    """``fitmap serve ARGS`` (offline) on ``port``; the process, once ``/health`` answers 200."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for name in drop_env:
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fitmap.cli", "serve", *args, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_healthy(proc: subprocess.Popen, base: str, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            assert proc.stdout is not None
            pytest.fail(f"fitmap serve exited: {proc.stdout.read()[-2000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"fitmap serve did not come up in {seconds:.0f} s")
