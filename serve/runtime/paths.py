"""Where the project's own files are: the shipped model and the blocklist (one copy each)."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = PROJECT_ROOT / "artifacts" / "xiaox"
DEFAULT_BLOCKLIST = PROJECT_ROOT / "data" / "blocklist.txt"
