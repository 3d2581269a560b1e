"""The real app for the pages, a plain HTTP chat client, and Chromium's launch options."""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path

import httpx

from tests.conftest import ROOT
from tests.serve._helpers_server import ServerProcess

ARTIFACTS = ROOT / "test-artifacts"  # screenshots and server logs (gitignored)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def readme_screenshot() -> Path | None:
    """Where to write the README's screenshot of the chat (``docs/chat.png``): only when
    $XIAOX_SCREENSHOT names it (relative to the repository), so that test runs leave the
    repository as it was."""
    target = os.environ.get("XIAOX_SCREENSHOT")
    if not target:
        return None
    path = Path(target)
    return path if path.is_absolute() else ROOT / path


def chromium_path() -> str | None:
    """Debian's Chromium: Playwright's own browser download does not work here."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def app_server(model_dir: Path, redis_url: str | None = None) -> ServerProcess:
    """The app the pages talk to: its log in test-artifacts/, its secret key in its
    environment (so a restarted app still accepts the page's session cookie)."""
    return ServerProcess(model_dir, ARTIFACTS, redis_url=redis_url,
                         env={"XIAOX_SECRET_KEY": secrets.token_hex(16)})


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
