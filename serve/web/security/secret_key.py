"""The secret keys that sign the session cookie: from the settings, or a file created once.

The file appears whole or not at all: the key is written to a private temporary file in
the same directory, flushed, then hard-linked to its name (``os.link`` fails when the name
exists, like ``O_EXCL``). Of several processes starting together one link wins; the others
read the winner's complete file, never a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path

MIN_KEY_CHARS = 32  # serve.web.settings.MIN_SECRET_KEY_CHARS (settings imports no security)


def load_or_create_secret_key(path: Path) -> str:
    """The key stored at ``path``; created once (random, mode 0600) when absent."""
    path = Path(path)
    existing = _read_key(path)
    if existing is not None:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_urlsafe(48)
    fd, tmp = tempfile.mkstemp(prefix=".secret_key.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and refuses to replace a key already there
        except FileExistsError:
            pass  # another process won: its file is complete
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    found = _read_key(path)
    if found is None:
        raise ValueError(f"{path}: the secret key file vanished while it was created")
    return found


def _read_key(path: Path) -> str | None:
    try:
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"{path}: the secret key is too short (under {MIN_KEY_CHARS} "
                         "characters); delete it to make a new one")
    return key


def signing_keys(secret_keys: tuple[str, ...], secret_key: str | None,
                 key_file: Path) -> list[str]:
    """The session keys, newest first: ``XIAOX_SECRET_KEYS``, else ``XIAOX_SECRET_KEY``,
    else the key file's. The first signs new cookies; every one verifies (rotation: put
    the new key first, keep the old one until its cookies have expired)."""
    if secret_keys:
        return list(secret_keys)
    if secret_key:
        return [secret_key]
    return [load_or_create_secret_key(key_file)]
