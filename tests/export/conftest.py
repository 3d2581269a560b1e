"""Fixtures of the export tests: a checkpoint with a backward model, and its int8 export."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.export._helpers import with_backward


@pytest.fixture(scope="session")
def paired_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    return with_backward(tiny_checkpoint, tmp_path_factory.mktemp("paired") / "ckpt")


@pytest.fixture(scope="session")
def paired_model_dir(paired_checkpoint, tmp_path_factory) -> Path:
    """int8, like the shipped folder: graphs, scoring graphs, reply index."""
    from export import export_model

    out = tmp_path_factory.mktemp("paired_model") / "paired"
    export_model(paired_checkpoint, out, quantize="int8", check_samples=20)
    return out
