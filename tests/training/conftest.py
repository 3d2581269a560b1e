"""Small corpora for the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training._helpers import synthetic_pairs


@pytest.fixture
def synthetic_corpus(tmp_path) -> Path:
    path = tmp_path / "synthetic.tsv"
    path.write_text("".join(f"{q}\t{a}\n" for q, a in synthetic_pairs(160)), encoding="utf-8")
    return path


@pytest.fixture
def real_corpora(shared_data, tmp_path) -> list[Path]:
    """A few hundred real pairs: ~400 xiaohuangji sessions and 200 CDial pairs."""
    conv = tmp_path / "xhj_head.conv"
    with (shared_data / "XHJ_5w.txt").open(encoding="utf-8") as f:
        conv.write_text("".join(next(f) for _ in range(1200)), encoding="utf-8")
    cdial = tmp_path / "cdial_head.txt"
    with (shared_data / "CDial-toy_train.txt").open(encoding="utf-8") as f:
        cdial.write_text("".join(next(f) for _ in range(200)), encoding="utf-8")
    return [conv, cdial]


