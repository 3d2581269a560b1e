"""The real app in a subprocess, a plain HTTP chat client, and Chromium's launch options."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import ROOT, free_port, wait_for_port

ARTIFACTS = ROOT / "test-artifacts"  # screenshots and server logs (gitignored)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    """Debian's Chromium: Playwright's own browser download does not work here."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def app_command(port: int, model_dir: Path, redis_url: str | None) -> list[str]:
    command = [sys.executable, "-m", "serve", "--port", str(port), "--model", str(model_dir),
               "--log-level", "warning"]
    if redis_url:
        command += ["--redis-url", redis_url]
    return command


class AppServer:
    """``python -m serve`` under uvicorn on a free port; restartable on the same port."""

    def __init__(self, model_dir: Path, secret: str, log_dir: Path,
                 redis_url: str | None = None, port: int | None = None):
        self.model_dir = model_dir
        self.secret = secret
        self.redis_url = redis_url
        self.port = port or free_port()
        self.log_path = log_dir / f"app-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        env = dict(os.environ, XIAOX_SECRET_KEY=self.secret, PYTHONUNBUFFERED="1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                app_command(self.port, self.model_dir, self.redis_url),
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with {self.proc.returncode}:\n{self.log()}")
            try:
                wait_for_port(self.port, timeout=0.5)
                if httpx.get(self.url + "/login", timeout=2).status_code == 200:
                    return
            except (TimeoutError, httpx.HTTPError):
                pass
        raise TimeoutError(f"the app did not answer on {self.url}:\n{self.log()}")

    def kill(self) -> None:
        """A crash: SIGKILL, no graceful shutdown."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


class ChatClient:
    """A second user talking to the room over plain HTTP, as the page does."""

    def __init__(self, base_url: str, user: str):
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, timeout=10)
        response = self.http.post("/login", data={"username": user})
        assert response.status_code in (200, 303), response.text
        self.user = user

    def send(self, room: str, text: str) -> None:
        response = self.http.post("/send", params={"room": room}, json={"message": text},
                                  headers={"Origin": self.base_url})
        assert response.status_code == 202, (response.status_code, response.text)

    def history(self, room: str) -> list[dict]:
        response = self.http.get("/history", params={"room": room})
        assert response.status_code == 200, response.text
        return response.json()["messages"]

    def wait_for_reply(self, room: str, text: str, timeout: float = 30.0) -> dict:
        """The bot's final message that follows the user message ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            messages = self.history(room)
            texts = [m["text"] for m in messages]
            if text in texts:
                later = messages[texts.index(text) + 1:]
                bots = [m for m in later if m["role"] == "bot"]
                if bots:
                    return bots[0]
            time.sleep(0.2)
        raise TimeoutError(f"no reply to {text!r} in {room}")

    def close(self) -> None:
        self.http.close()
