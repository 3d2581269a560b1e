"""The secret key that signs the session cookie: read from a file, created once."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path


def load_or_create_secret_key(path: Path) -> str:
    """The key stored at ``path``; created once (random, mode 0600) when absent."""
    path = Path(path)
    try:
        key = path.read_text(encoding="utf-8").strip()
        if len(key) >= 32:
            return key
        raise ValueError(f"{path}: the secret key is too short; delete it to make a new one")
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_urlsafe(48)
    try:
        # O_EXCL: of several workers starting at once exactly one writes the key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another process is writing it right now
            existing = path.read_text(encoding="utf-8").strip()
            if existing:
                return existing
            time.sleep(0.02)
        raise ValueError(f"{path}: empty secret key file") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(key + "\n")
    return key
