"""The one launcher of servers in their own processes, for the benchmarks and the tests.

``ServerProcess``: ``python -m serve`` on a free port (a subclass changes ``command`` or
``environment``: the TensorFlow baseline, the bare sse-starlette floor), stopped with
SIGTERM; ``start_servers`` and ``running`` for several at once. ``tests/serve/
_helpers_server.py`` re-exports these names (the tests import the benchmarks, never the
other way round).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from benchmarks.common import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerDied(RuntimeError):
    """The server process exited before it was healthy."""


def wait_healthy(url: str, proc: subprocess.Popen, describe: Callable[[], str],
                 timeout: float = 90.0, path: str = "/healthz") -> None:
    """Until ``GET url/healthz`` is 200; ServerDied when ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerDied(f"exited early ({proc.returncode}):\n{describe()}")
        try:
            if httpx.get(url + path, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} is not healthy after {timeout}s:\n{describe()}")


class ServerProcess:
    """``python -m serve`` on a free port, in its own process, stopped with SIGTERM.

    Its log is ``workdir/server-<port>.log``; its secret key file ``workdir/secret_key``
    (servers sharing a workdir accept each other's session cookies), unless ``env`` sets
    ``XIAOX_SECRET_KEY``. It can be started again after ``stop`` or ``kill``.
    """

    health_path = "/healthz"

    def __init__(self, model_dir: Path, workdir: Path, *, redis_url: str | None = None,
                 env: dict[str, str] | None = None, port: int | None = None):
        self.model_dir = model_dir
        self.workdir = workdir
        self.redis_url = redis_url
        self.port = port or free_port()
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"server-{self.port}.log"

    def client(self, **kwargs) -> httpx.AsyncClient:
        """An HTTP client of this server (timeout 30 s unless given)."""
        return httpx.AsyncClient(base_url=self.url, **{"timeout": 30, **kwargs})

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "serve", "--model", str(self.model_dir),
                   "--port", str(self.port)]
        return command + (["--redis-url", self.redis_url] if self.redis_url else [])

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("XIAOX_")}
        env.update({"XIAOX_SECRET_KEY_FILE": str(self.workdir / "secret_key"),
                    "XIAOX_LOG_LEVEL": "warning", "XIAOX_DRAIN_SECONDS": "5",
                    "XIAOX_THREADS": "1",  # several servers share two cores
                    "PYTHONUNBUFFERED": "1"})
        env.update(self.extra_env)
        return env

    def launch(self) -> ServerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=self.environment(),
                                     stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def wait_healthy(self, timeout: float = 90.0) -> ServerProcess:
        if self.proc is None:
            raise ServerDied("the server was never launched")
        wait_healthy(self.url, self.proc, self.log_tail, timeout, self.health_path)
        return self

    def start(self) -> ServerProcess:
        start_servers(self)
        return self

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (the server drains) and wait: the exit code; killed if it hangs."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._close_log()
        return self.proc.returncode

    def kill(self) -> None:
        """A crash: SIGKILL, no graceful shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_log()

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.terminate(timeout)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def start_servers(*servers: ServerProcess, timeout: float = 90.0) -> None:
    """Launch several at once (model loading overlaps), then wait for all.

    A server that dies while starting is relaunched once on a new port: on a shared
    machine a free port can be taken between ``free_port()`` and uvicorn's bind.
    """
    ports = set()
    for server in servers:
        while server.port in ports:
            server.port = free_port()
        ports.add(server.port)
        server.launch()
    for server in servers:
        try:
            server.wait_healthy(timeout)
        except ServerDied as first:
            server.stop()
            server.port = free_port()
            try:
                server.launch().wait_healthy(timeout)
            except ServerDied as second:
                raise second from first


@contextlib.contextmanager
def running(*servers: ServerProcess) -> Iterator[tuple[ServerProcess, ...]]:
    """The servers started together, and stopped on the way out (also when one fails)."""
    try:
        start_servers(*servers)
        yield servers
    finally:
        for server in servers:
            server.stop()
