"""The checks of ``--resume`` (what may change, the same data) and the command history."""

from __future__ import annotations

from pathlib import Path

from training import checkpoint as ckpt
from training.config import ConfigError, TrainConfig
from training.corpus import CorpusError

# What --resume may change; every other setting must equal the saved run's.
RESUMABLE_SETTINGS = {"epochs", "max_steps", "max_minutes", "checkpoint_every", "progress",
                      "threads", "patience"}


def command_history(out: Path, command: str, resume: bool) -> dict:
    """The command that started the run, and each that resumed it (the exact recipe)."""
    if not resume:
        return {"command": command}
    saved = ckpt.read_config(out)
    return {"command": saved.get("command", command),
            "resumed_with": [*saved.get("resumed_with", []), command]}


def _check_resumable(config: TrainConfig, out: Path) -> None:
    saved = ckpt.read_config(out)["train"]
    current = config.to_dict()
    changed = sorted(k for k in current if k not in RESUMABLE_SETTINGS
                     and k in saved and saved[k] != current[k])
    if changed:
        diffs = ", ".join(f"{k} {saved[k]!r} -> {current[k]!r}" for k in changed)
        raise ConfigError(f"--resume cannot change {diffs} (only "
                          f"{', '.join(sorted(RESUMABLE_SETTINGS))} may change)")


def _comparable(cleaning: dict) -> dict:
    # A rule added since a run was saved counts 0 there: an older run can still resume.
    return {k: v for k, v in cleaning.items() if v != 0}


def check_same_data(out: Path, corpora_info: list[dict], cleaning: dict) -> None:
    # The split and the data order derive from the pairs: other pairs, another run.
    saved = ckpt.read_config(out)
    if saved.get("corpora") != corpora_info or (
            _comparable(saved.get("cleaning", {})) != _comparable(cleaning)):
        raise CorpusError(f"--resume needs the corpora and cleaning of the saved run: saved "
                          f"{saved.get('corpora')} kept {saved.get('cleaning', {}).get('kept')}, "
                          f"now {corpora_info} kept {cleaning['kept']}")


def check_folder(config: TrainConfig, out: Path, resume: bool) -> None:
    if resume:
        _check_resumable(config, out)
    elif (out / ckpt.CONFIG_FILE).exists() or (out / ckpt.STATE_DIR).exists():
        raise ConfigError(f"{out} already holds a checkpoint: pass --resume to continue it, "
                          f"or choose another --out")
