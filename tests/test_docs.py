"""The documentation kept complete: every server setting in deploy/README.md's table."""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path

from serve.web.settings import Settings, _env_name
from tests.conftest import ROOT


def settings_rows(readme: Path) -> list[list[str]]:
    """The rows of the table under "## Settings": [variables, default, meaning]."""
    section = readme.read_text(encoding="utf-8").split("## Settings", 1)[1]
    section = section.split("\n## ", 1)[0]
    rows = [line.strip().strip("|").split(" | ") for line in section.splitlines()
            if line.startswith("| `XIAOX_")]
    assert rows, "no settings table"
    return rows


def documented_default(value: object) -> str | None:
    """How a plain default is written in the table (None: described in words)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float | str) and value != "":
        return str(value)
    return None


def test_every_setting_is_in_the_deploy_readme_with_its_default():
    rows = settings_rows(ROOT / "deploy" / "README.md")
    for f in fields(Settings):
        name = _env_name(f.name)
        row = next((r for r in rows if f"`{name}`" in r[0]), None)
        assert row is not None, f"{name} ({f.name}) is missing from deploy/README.md's table"
        default = f.default if f.default is not MISSING else None
        written = documented_default(default)
        if written is not None:
            assert written in row[1], f"{name}: the table's default {row[1]!r}, not {written}"
