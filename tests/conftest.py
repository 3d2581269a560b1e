"""Fixtures shared by the whole suite: real servers on free ports, real models."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
SHIPPED_MODEL = ROOT / "artifacts" / "xiaox"
DEMO_CORPUS = ROOT / "data" / "demo_corpus.tsv"
# The tiny_checkpoint's TrainConfig (tests that train a twin of it use the same: same split).
TINY_TRAINING = dict(embed_dim=16, hidden_dim=32, batch_size=16, max_steps=30, epochs=1,
                     min_freq=1, vocab_size=2000, seed=7, progress=False)

from training.environment import configure_tensorflow_environment  # noqa: E402

configure_tensorflow_environment()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a skip that says why."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared corpora in {SHARED_DATA} (present in CI)")
    return SHARED_DATA


class RedisServer:
    """A real redis-server on a free port, in its own temporary folder."""

    def __init__(self, workdir: Path, extra_args: tuple[str, ...] = ()):
        self.workdir = workdir
        self.port = free_port()
        self.extra_args = extra_args  # e.g. --replicaof, --cluster-enabled (tests/reliability)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed: run the README's test command")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--dir",
                str(self.workdir),
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        """A crash: SIGKILL (no shutdown, no final AOF rewrite); ``start`` brings it back."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shipped_model_dir() -> Path:
    if not (SHIPPED_MODEL / "manifest.json").is_file():
        pytest.fail(f"the shipped model is missing from {SHIPPED_MODEL}")
    return SHIPPED_MODEL


@pytest.fixture(scope="session")
def model_dir(shipped_model_dir) -> Path:
    """The model the serving tests run on: the shipped one (no TensorFlow needed), or the
    folder named by $XIAOX_TEST_MODEL (to run the serving suite on another export)."""
    other = os.environ.get("XIAOX_TEST_MODEL")
    return Path(other) if other else shipped_model_dir


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny model trained for a few steps on the demo corpus (needs TensorFlow)."""
    pytest.importorskip("tensorflow")
    from training.config import TrainConfig
    from training.train import train

    out = tmp_path_factory.mktemp("tiny_checkpoint")
    train(TrainConfig(**TINY_TRAINING), corpora=[DEMO_CORPUS], out=out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint exported to ONNX (fp32) with its manifest."""
    from export import export_model

    out = tmp_path_factory.mktemp("tiny_model") / "tiny"
    export_model(tiny_checkpoint, out, quantize="none", check_samples=20)
    return out
