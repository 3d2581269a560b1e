"""The layout's import rules (pyproject.toml ``[tool.importlinter]``) hold, and breaking one
fails the lint env: the check runs on this tree, then on a copy with one bad import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("serve", "training", "export", "benchmarks", "tests")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter not installed")


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__", "static", "*.onnx"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_tree_keeps_every_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "bad_import", "contract"),
    [
        ("serve/runtime/_bad.py", "import starlette", "The runtime imports no web framework"),
        ("serve/runtime/_bad.py", "import tensorflow", "The runtime imports no web framework"),
        ("training/_bad.py", "from serve.web import app", "Training, export and benchmarks"),
        ("benchmarks/_bad.py", "import tests.conftest", "Benchmarks never import the tests"),
        ("serve/runtime/tokenizer.py", "from serve.runtime import engine", "No import cycle"),
    ],
)
def test_breaking_a_rule_fails_lint(tree_copy: Path, module: str, bad_import: str, contract: str):
    assert verdict(lint_imports(tree_copy), contract) == "KEPT"
    path = tree_copy / module
    source = path.read_text(encoding="utf-8") if path.exists() else ""
    path.write_text(source + f"\n{bad_import}  # noqa\n", encoding="utf-8")
    result = lint_imports(tree_copy)
    assert result.returncode != 0
    assert verdict(result, contract) == "BROKEN"


def verdict(result: subprocess.CompletedProcess, contract: str) -> str:
    """KEPT or BROKEN: the word that ends the summary line of the contract named so."""
    lines = [line for line in result.stdout.splitlines()
             if line.startswith(contract) and line.split()[-1] in ("KEPT", "BROKEN")]
    assert len(lines) == 1, result.stdout
    return lines[0].split()[-1]
