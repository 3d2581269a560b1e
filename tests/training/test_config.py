"""TrainConfig: defaults, TOML, validation; the CLI's flags and their precedence."""

from __future__ import annotations

from dataclasses import fields

import pytest

from serve.runtime.manifest import portable_command
from training.__main__ import build_parser, resolve_config
from training.config import PROJECT_ROOT, ConfigError, TrainConfig


def test_the_fields_others_depend_on_exist():
    config = TrainConfig(embed_dim=16, hidden_dim=32, batch_size=16, max_steps=30, epochs=1,
                         min_freq=1, vocab_size=2000, seed=7, progress=False)
    for name in ("bidirectional", "share_embedding", "tie_output", "dropout", "max_minutes",
                 "learning_rate", "optimizer", "clip_norm", "max_src_len", "max_tgt_len",
                 "valid_fraction", "valid_max", "patience", "checkpoint_every", "blocklist"):
        assert hasattr(config, name)
    assert config.blocklist_path().resolve() == PROJECT_ROOT / "data" / "blocklist.txt"
    assert config.effective_learning_rate == 1e-3
    assert TrainConfig(optimizer="sgd").effective_learning_rate == 1.0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"dropout": 1.0}, "dropout must be in"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"hidden_dim": 33}, "hidden_dim must be even"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of"),
        ({"valid_fraction": 0.0}, "valid_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"max_answer_repeats": -1}, "max_answer_repeats"),
        ({"vocab_size": 4}, "vocab_size must be > 4"),
        ({"max_steps": -1}, "max_steps must be >= 0"),
        ({"epochs": "3"}, "epochs must be of type int"),
        ({"progress": 1}, "progress must be of type bool"),
    ],
)
def test_out_of_range_values_raise_a_clear_error(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**settings)


def test_toml_top_level_or_train_table(tmp_path):
    (tmp_path / "a.toml").write_text("embed_dim = 32\nlearning_rate = 1\n", encoding="utf-8")
    (tmp_path / "b.toml").write_text("[train]\noptimizer = 'sgd'\nblocklist = 'none'\n",
                                     encoding="utf-8")
    a = TrainConfig.from_toml(tmp_path / "a.toml")
    assert a.embed_dim == 32 and a.learning_rate == 1.0
    b = TrainConfig.from_toml(tmp_path / "b.toml")
    assert b.optimizer == "sgd" and b.blocklist is None


@pytest.mark.parametrize(
    ("text", "message"),
    [("epochs = 0\n", "epochs must be >= 1"), ("epoch = 3\n", "unknown setting"),
     ("epochs = \n", "not valid TOML")],
)
def test_bad_toml_raises_a_clear_error(tmp_path, text, message):
    (tmp_path / "c.toml").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_toml(tmp_path / "c.toml")


def test_every_setting_has_a_documented_flag_with_its_default():
    help_text = " ".join(build_parser().format_help().split())
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in help_text
    for flag in ("--corpus", "--out", "--config", "--epochs", "--max-minutes", "--resume",
                 "--batch-size", "--embed-dim", "--hidden-dim", "--vocab-size", "--min-freq",
                 "--learning-rate", "--optimizer", "--seed", "--checkpoint-every",
                 "--max-steps", "--valid-max", "--format", "--blocklist", "--threads"):
        assert flag in help_text
    assert "(default: 64)" in help_text  # batch size


def test_flags_override_the_toml_file(tmp_path):
    (tmp_path / "c.toml").write_text("embed_dim = 32\nepochs = 4\n", encoding="utf-8")
    args = build_parser().parse_args(["--corpus", "x.tsv", "--out", str(tmp_path / "o"),
                                      "--config", str(tmp_path / "c.toml"), "--epochs", "2",
                                      "--no-progress"])
    config = resolve_config(args)
    assert (config.embed_dim, config.epochs, config.progress) == (32, 2, False)


def test_the_recorded_command_has_no_absolute_path():
    argv = ["--corpus", "/somewhere/data/x.tsv", "--out=/tmp/run", "--epochs", "2"]
    command = portable_command("python -m training", argv)
    assert command == "python -m training --corpus x.tsv --out=run --epochs 2"


def write_run_config(folder, train: dict, corpora: list[str]):
    import json

    folder.mkdir()
    path = folder / "config.json"
    path.write_text(json.dumps({"format_version": 1, "train": train,
                                "corpora": [{"file": c, "format": "tsv", "pairs": 9}
                                            for c in corpora]}), encoding="utf-8")
    return path


def test_config_reads_a_runs_config_json_or_its_folder(tmp_path, caplog):
    recorded = {**TrainConfig(embed_dim=24, max_minutes=5.0, epochs=3).to_dict(),
                "retired_setting": 1}
    path = write_run_config(tmp_path / "run", recorded, ["chat.tsv"])
    for given in (path, path.parent):
        caplog.clear()
        args = build_parser().parse_args(["--corpus", "other.tsv", "--out", "o", "--config",
                                          str(given), "--epochs", "2"])
        config = resolve_config(args)
        assert (config.embed_dim, config.max_minutes, config.epochs) == (24, 5.0, 2)
        assert "retired_setting" in caplog.text  # ignored, with a warning
        assert "chat.tsv" in caplog.text and "other.tsv" in caplog.text
    caplog.clear()
    args = build_parser().parse_args(["--corpus", "chat.tsv", "--out", "o", "--config",
                                      str(path)])
    resolve_config(args)
    assert "chat.tsv" not in caplog.text  # the same corpora: no warning


@pytest.mark.parametrize(("text", "message"),
                         [("{", "not valid JSON"), ('{"model": {}}', "no train section"),
                          (None, "config file not found")])
def test_a_bad_config_json_raises_a_clear_error(tmp_path, text, message):
    from training.config import read_config_file

    path = tmp_path / "config.json"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        read_config_file(path)
