"""The models a run trains (forward, backward or both) and direction "both": two child
processes, one model each, pinned to their own cores."""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import replace
from pathlib import Path

from serve.runtime.tokenizer import Vocab
from training import checkpoint as ckpt
from training.config import ConfigError, TrainConfig
from training.corpus import CorpusError
from training.data import PreparedData
from training.job import train_model
from training.loop import TrainingInterrupted

log = logging.getLogger("training")

BACKWARD_DIR = "backward"  # direction "both": the backward model's checkpoint folder


def _cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def plan_jobs(config: TrainConfig, out: Path) -> list[tuple[TrainConfig, str, Path]]:
    """(config, model direction, folder) of each model the run trains.

    With "both", the forward folder's config keeps direction "both" (so that ``--resume``
    on it resumes both); the backward folder's says "backward". Each gets half the cores'
    threads, and only the forward one draws a progress bar.
    """
    if config.direction != "both":
        return [(config, config.direction, out)]
    threads = max(1, (config.threads or len(_cores())) // 2)
    return [(replace(config, threads=threads), "forward", out),
            (replace(config, threads=threads, direction="backward", progress=False),
             "backward", out / BACKWARD_DIR)]


def train_in_parallel(jobs, data: PreparedData, vocab: Vocab, *, resume: bool,
                       command: str) -> None:
    """Each model in a spawned child process pinned to its own cores (where the OS lets us).

    Ctrl-C reaches the children (one process group): each saves its checkpoint, and this
    process waits for both before it reports the interruption.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # fork would copy threads and locks
    cores = _cores()
    previous = None
    if threading.current_thread() is threading.main_thread():
        # The children handle Ctrl-C (each saves); this process only waits for them.
        previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        children = []
        for index, (job_config, direction, folder) in enumerate(jobs):
            pinned = cores[index::len(jobs)] if len(cores) >= len(jobs) else None
            receiver, sender = context.Pipe(duplex=False)
            job_data = data.swapped() if direction == "backward" else data
            process = context.Process(
                target=_child_main, name=f"training-{direction}",
                args=(sender, job_config, job_data, vocab.tokens, folder, resume, command,
                      direction, pinned))
            process.start()
            sender.close()
            children.append((direction, folder, process, receiver))
        results = [_child_result(direction, process, receiver)
                   for direction, _, process, receiver in children]
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    _raise_child_failures(results, [folder for _, folder, _, _ in children])


def _child_result(direction: str, process, receiver) -> tuple:
    try:
        result = receiver.recv()
    except EOFError:
        result = None
    process.join()
    if result is None:
        result = ("crash", f"the process died (exit code {process.exitcode})")
    return (direction, *result)


def _raise_child_failures(results: list[tuple], folders: list[Path]) -> None:
    errors = {"ConfigError": ConfigError, "CorpusError": CorpusError,
              "CheckpointError": ckpt.CheckpointError}
    for direction, status, *detail in results:
        if status == "error":
            raise errors.get(detail[0], RuntimeError)(f"{direction} model: {detail[1]}")
        if status == "crash":
            raise RuntimeError(f"{direction} model: {detail[0]}")
    if any(status == "killed" for _, status, *_ in results):
        raise KeyboardInterrupt  # a second Ctrl-C: stopped without saving
    interrupted = [(detail[0], folder) for (_, status, *detail), folder
                   in zip(results, folders, strict=True) if status == "interrupted"]
    if interrupted:
        raise TrainingInterrupted(*interrupted[0])


def _child_main(conn, config: TrainConfig, data: PreparedData, vocab_tokens: list[str],
                out: Path, resume: bool, command: str, direction: str,
                cores: list[int] | None) -> None:
    """The body of one child process of direction "both"; reports through ``conn``."""
    import traceback

    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    from training.environment import configure_tensorflow_environment

    configure_tensorflow_environment()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[{direction}] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        train_model(config, data, Vocab(vocab_tokens), Path(out), resume=resume,
                    command=command, direction=direction)
        conn.send(("ok",))
    except TrainingInterrupted as e:
        conn.send(("interrupted", e.step))
    except (ConfigError, CorpusError, ckpt.CheckpointError) as e:
        conn.send(("error", type(e).__name__, str(e)))
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training began
        conn.send(("killed",))
    except BaseException:  # noqa: BLE001 - the parent reports it
        conn.send(("crash", traceback.format_exc(limit=5)))
    finally:
        conn.close()
