"""``TrainConfig``: every knob of a training run, from defaults, a TOML file (or an earlier
run's ``config.json``) and CLI flags.

This module imports neither TensorFlow nor jieba, so ``python -m training --help`` is instant.
"""

from __future__ import annotations

import json
import logging
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from serve.runtime.paths import DEFAULT_BLOCKLIST as _BLOCKLIST_PATH
from serve.runtime.paths import PROJECT_ROOT

# Recorded relative (config.json names no path of the training machine): the project's
# root, or the cwd.
DEFAULT_BLOCKLIST = _BLOCKLIST_PATH.relative_to(PROJECT_ROOT).as_posix()
OPTIMIZERS = ("adam", "sgd")
TOKENS = ("word", "char")  # jieba words, or one token a character (ASCII runs kept whole)
DIRECTIONS = ("forward", "backward", "both")
# select_by: the metric deciding best.weights.h5, and whether lower values are better.
SELECT_BY = {"valid_loss": "lower", "valid_distinct2": "higher", "valid_bleu2": "higher",
             "valid_top10_share": "lower"}
DEFAULT_LEARNING_RATE = {"adam": 1e-3, "sgd": 1.0}  # sgd 1.0 is the original's
RUN_CONFIG_FILE = "config.json"  # a checkpoint folder's (training.checkpoint.CONFIG_FILE)

log = logging.getLogger("training")


class ConfigError(ValueError):
    """A configuration value is out of range or of the wrong type (one clear message)."""


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class TrainConfig:
    # -- model (training.model.ModelConfig) --
    embed_dim: int = field(default=256, metadata=_help("word embedding size"))
    hidden_dim: int = field(default=512, metadata=_help("decoder state size (even)"))
    bidirectional: bool = field(default=True, metadata=_help("bidirectional LSTM encoder"))
    share_embedding: bool = field(default=True, metadata=_help("one embedding for both sides"))
    tie_output: bool = field(default=True, metadata=_help("output projection = embedding"))
    dropout: float = field(default=0.2, metadata=_help("dropout rate in [0, 1)"))
    # -- optimisation --
    batch_size: int = field(default=64, metadata=_help("pairs per step"))
    epochs: int = field(default=10, metadata=_help("passes over the training pairs"))
    max_steps: int = field(default=0, metadata=_help("stop after this many steps (0 = no limit)"))
    max_minutes: float = field(
        default=0.0, metadata=_help("stop (and save) after this many minutes (0 = no limit)")
    )
    optimizer: str = field(default="adam", metadata=_help("adam, or sgd (the original's)"))
    learning_rate: float = field(
        default=0.0, metadata=_help("0 = the optimizer's default: adam 0.001, sgd 1.0")
    )
    lr_decay: float = field(
        default=0.9, metadata=_help("sgd: multiply the rate by this when validation stalls")
    )
    clip_norm: float = field(default=5.0, metadata=_help("global gradient norm clip (0 = off)"))
    patience: int = field(
        default=3, metadata=_help("early stop after this many epochs without improvement (0 = off)")
    )
    label_smoothing: float = field(
        default=0.0,
        metadata=_help("label smoothing epsilon in [0, 1): loss = (1-e)*NLL - e*mean_v log p[v] "
                       "(training loss only; validation stays plain NLL)"),
    )
    itf_power: float = field(
        default=0.0,
        metadata=_help("inverse token frequency loss weighting (Nakamura et al. 2019): weight "
                       "each target token by 1/freq^power, mean 1 (0 = off)"),
    )
    # -- data --
    max_src_len: int = field(default=30, metadata=_help("drop pairs whose question has more words"))
    max_tgt_len: int = field(default=30, metadata=_help("drop pairs whose answer has more words"))
    min_freq: int = field(default=2, metadata=_help("keep words seen at least this often"))
    vocab_size: int = field(default=20000, metadata=_help("vocabulary size, specials included"))
    valid_fraction: float = field(
        default=0.05, metadata=_help("fraction of pairs held out for validation")
    )
    valid_max: int = field(default=2000, metadata=_help("at most this many held-out pairs"))
    test_fraction: float = field(
        default=0.0,
        metadata=_help("fraction of pairs split off first as a test set, never trained on nor "
                       "used to pick a checkpoint (test.tsv; 0 = none)"),
    )
    test_max: int = field(default=2000, metadata=_help("at most this many test pairs"))
    holdout_from: str = field(
        default="",
        metadata=_help("an earlier run's folder ('' = none): its valid.tsv and test.tsv "
                       "are this run's too, and pairs equal to them are kept out of training "
                       "(runs with other cleaning or tokens, compared on the same held-out "
                       "pairs); test_fraction and valid_fraction are then unused"),
    )
    max_answer_repeats: int = field(
        default=0, metadata=_help("keep each distinct answer at most this often (0 = no cap)")
    )
    max_answer_entropy: float = field(
        default=0.0,
        metadata=_help("drop pairs whose answer's entropy (bits) over the questions it answers "
                       "is above this (Csaky et al. 2019; applied before the repeat cap; 0 = off)"),
    )
    tokens: str = field(
        default="word",
        metadata=_help("word (jieba words) or char (one token a character, ASCII letter/digit "
                       "runs whole); in char mode max_src_len/max_tgt_len count characters"),
    )
    blocklist: str | None = field(
        default=DEFAULT_BLOCKLIST,
        metadata=_help("blocklist file ('none' = no blocklist); relative paths: cwd, then project"),
    )
    # -- run --
    direction: str = field(
        default="forward",
        metadata=_help("forward (question -> answer), backward (answer -> question, for MMI "
                       "reranking) or both (forward in OUT, backward in OUT/backward, in "
                       "parallel, one core each)"),
    )
    eval_replies: int = field(
        default=300,
        metadata=_help("at each epoch end, greedily answer this many validation questions and "
                       "record valid_distinct2, valid_top10_share, valid_bleu2 (0 = off)"),
    )
    select_by: str = field(
        default="valid_loss",
        metadata=_help("which epoch's weights become best.weights.h5: valid_loss, "
                       "valid_distinct2, valid_bleu2 or valid_top10_share (early stopping "
                       "always watches valid_loss)"),
    )
    checkpoint_every: int = field(default=500, metadata=_help("save a checkpoint every N steps"))
    seed: int = field(default=1, metadata=_help("seed of weights, dropout, split and data order"))
    threads: int = field(
        default=0, metadata=_help("TensorFlow intra/inter-op threads (0 = TensorFlow's choice)")
    )
    progress: bool = field(default=True, metadata=_help("show a progress bar"))

    def __post_init__(self) -> None:
        self.validate()

    @property
    def effective_learning_rate(self) -> float:
        return self.learning_rate or DEFAULT_LEARNING_RATE[self.optimizer]

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "blocklist":
                if value is not None and not isinstance(value, str | Path):
                    raise ConfigError("blocklist must be a path or none")
                continue
            expected = {"int": int, "float": (int, float), "bool": bool, "str": str}[f.type]
            if isinstance(value, bool) != (f.type == "bool") or not isinstance(value, expected):
                raise ConfigError(f"{f.name} must be of type {f.type}, got {value!r}")
        positive = ("embed_dim", "hidden_dim", "batch_size", "epochs", "max_src_len",
                    "max_tgt_len", "min_freq", "valid_max", "test_max", "checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        non_negative = ("max_steps", "max_minutes", "learning_rate", "clip_norm", "patience",
                        "threads", "seed", "max_answer_repeats", "max_answer_entropy",
                        "itf_power", "eval_replies")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.bidirectional and self.hidden_dim % 2:
            raise ConfigError(f"hidden_dim must be even with a bidirectional encoder, "
                              f"got {self.hidden_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ConfigError(f"valid_fraction must be in (0, 1), got {self.valid_fraction}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if not 0.0 < self.lr_decay <= 1.0:
            raise ConfigError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, "
                              f"got {self.optimizer!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name, allowed in (("tokens", TOKENS), ("direction", DIRECTIONS),
                              ("select_by", tuple(SELECT_BY))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        if self.select_by != "valid_loss" and not self.eval_replies:
            raise ConfigError(f"select_by {self.select_by} needs eval_replies > 0")
        if self.vocab_size <= 4:
            raise ConfigError(f"vocab_size must be > 4 (4 special tokens), got {self.vocab_size}")

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> TrainConfig:
        """Read a TOML file of TrainConfig fields (top level or a [train] table)."""
        return cls.from_dict({**read_toml(path), **overrides}, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s): {', '.join(unknown)}")
        data = dict(data)
        if isinstance(data.get("blocklist"), str) and data["blocklist"].lower() in ("", "none"):
            data["blocklist"] = None
        if isinstance(data.get("max_minutes"), int) and not isinstance(data["max_minutes"], bool):
            data["max_minutes"] = float(data["max_minutes"])
        for name in ("dropout", "learning_rate", "lr_decay", "clip_norm", "valid_fraction",
                     "test_fraction", "label_smoothing", "itf_power", "max_answer_entropy"):
            if isinstance(data.get(name), int) and not isinstance(data[name], bool):
                data[name] = float(data[name])
        return cls(**data)

    def to_dict(self) -> dict:
        """JSON-ready; the blocklist is recorded by name, never as an absolute path."""
        data = asdict(self)
        if data["blocklist"] is not None:
            blocklist = Path(data["blocklist"])
            data["blocklist"] = blocklist.name if blocklist.is_absolute() else str(blocklist)
        return data

    def blocklist_path(self) -> Path | None:
        """The blocklist file: as given if it exists from the cwd, else under the project."""
        if self.blocklist is None:
            return None
        path = Path(self.blocklist)
        if path.is_absolute() or path.exists():
            return path
        return PROJECT_ROOT / path


def read_toml(path: str | Path) -> dict:
    """The settings of a TOML file: its top level, or its [train] table if it has one."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return data.get("train", data)


@dataclass(frozen=True)
class ConfigFile:
    """The settings of a ``--config`` file; ``corpora``: the corpus file names a run's
    config.json records (the corpora themselves are --corpus flags), None for TOML."""

    settings: dict
    corpora: list[str] | None = None


def read_config_file(path: str | Path) -> ConfigFile:
    """A TOML file, or a checkpoint folder's config.json (or the folder itself).

    From a config.json the whole ``train`` section is taken, run-control values such as
    max_minutes included (a reproduction is the same run); a field this TrainConfig does not
    know (a run of another version) is dropped with a warning.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RUN_CONFIG_FILE
    if path.suffix.lower() != ".json":
        return ConfigFile(read_toml(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("train"), dict):
        raise ConfigError(f"{path}: not a checkpoint folder's config.json (no train section)")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data["train"]) - known)
    if unknown:
        log.warning("warning: %s: ignoring setting(s) this version does not know: %s", path,
                    ", ".join(unknown))
    corpora = [c.get("file") for c in data.get("corpora", []) if isinstance(c, dict)]
    return ConfigFile({k: v for k, v in data["train"].items() if k in known}, corpora)
