"""The servers a benchmark starts: ``python -m serve`` on a free port, its own process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.common import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m serve`` on a free port, stopped with SIGTERM; its output in a log."""

    def __init__(self, model_dir: Path, workdir: Path, *, redis_url: str | None = None,
                 env: dict[str, str] | None = None):
        self.model_dir = model_dir
        self.workdir = workdir
        self.redis_url = redis_url
        self.port = free_port()
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"server-{self.port}.log"
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "serve", "--model", str(self.model_dir),
                   "--port", str(self.port)]
        return command + (["--redis-url", self.redis_url] if self.redis_url else [])

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("XIAOX_")}
        env.update({"XIAOX_SECRET_KEY_FILE": str(self.workdir / "secret_key"),
                    "XIAOX_LOG_LEVEL": "warning", "XIAOX_DRAIN_SECONDS": "5",
                    "XIAOX_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        env.update(self.extra_env)
        return env

    def launch(self) -> ServerProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=self.environment(),
                                     stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def wait_healthy(self, timeout: float = 90.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"the server exited early ({code}):\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the server is not healthy after {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (the server drains) and wait; killed if it does not end in time."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""
