"""Helpers of the export tests: a backward model beside a tiny checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import DEMO_CORPUS, TINY_TRAINING


def with_backward(forward: Path, out: Path) -> Path:
    """A copy of the checkpoint ``forward`` with a backward model (answer -> question, the
    same corpus, split and vocabulary) trained into ``out/backward``, as --direction both
    leaves it."""
    from training.config import TrainConfig
    from training.train import train

    shutil.copytree(forward, out)
    train(TrainConfig(**TINY_TRAINING, direction="backward"), corpora=[DEMO_CORPUS],
          out=out / "backward")
    return out


def edit_config(checkpoint: Path, **changes) -> None:
    path = checkpoint / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(changes)
    path.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
