"""Helpers of the training tests: synthetic pairs and the CLI in a subprocess."""

from __future__ import annotations

import os
import random
import subprocess
import sys

from tests.conftest import ROOT

TINY = ["--embed-dim", "16", "--hidden-dim", "32", "--batch-size", "16", "--min-freq", "1",
        "--vocab-size", "2000", "--seed", "7", "--no-progress", "--threads", "1"]


def synthetic_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` distinct template pairs: enough structure for a tiny model to learn something."""
    names = ["小明", "小红", "老王", "妈妈", "我们", "你们", "老师", "同学"]
    things = ["苹果", "米饭", "音乐", "电影", "足球", "猫", "狗", "咖啡", "下雨", "周末"]
    pairs = [(f"{name}喜欢{thing}吗", f"{name}很喜欢{thing}") for name in names for thing in things]
    pairs += [(f"{name}在做什么", f"{name}在看{thing}") for name in names for thing in things]
    random.Random(seed).shuffle(pairs)
    if n > len(pairs):
        raise ValueError(f"at most {len(pairs)} synthetic pairs")
    return pairs[:n]


def cli_env() -> dict:
    env = dict(os.environ)
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)  # the CLI must set it itself
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = str(ROOT)
    return env


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", *map(str, args)], cwd=ROOT,
                          env=cli_env(), capture_output=True, text=True, timeout=timeout)


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "training", *map(str, args)], cwd=ROOT,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
