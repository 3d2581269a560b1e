"""What every benchmark shares: the machine's description, the weights under test, results.

All contenders run on the same weights: a checkpoint (given, or trained for a few steps
in a work folder with the shipped model's dimensions) exported to int8 and fp32 model
folders. Weights only change what a reply says, and every contender is forced to replies
of the same length (min_length = max_length), so the speed comparison is fair.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = ROOT / "artifacts" / "xiaox"
DEMO_CORPUS = ROOT / "data" / "demo_corpus.tsv"
SHARED_CORPUS = ROOT.parent / "shared" / "data" / "XHJ_5w.txt"
DEFAULT_OUT = ROOT / "benchmarks" / "results"


def shown(path: Path | str) -> str:
    """A path as a command in the results shows it: relative to the repository when inside
    it (no machine paths in the committed results)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the machine -------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


def versions() -> dict[str, str]:
    """Versions of what is measured (TensorFlow only when already imported: it is slow)."""
    import numpy
    import onnxruntime

    found = {"python": platform.python_version(), "numpy": numpy.__version__,
             "onnxruntime": onnxruntime.__version__}
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        found["tensorflow"] = tf.__version__
    else:
        try:
            from importlib.metadata import version

            found["tensorflow"] = version("tensorflow-cpu")
        except Exception:
            found["tensorflow"] = "not installed"
    return found


def machine() -> dict:
    memory = memory_total_gb()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(memory, 1) if memory else None,
        "os": f"{platform.system()} {platform.release()}",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "versions": versions(),
    }


def machine_lines(info: dict) -> list[str]:
    v = info["versions"]
    load = ", ".join(f"{x:.2f}" for x in info["load_average_at_start"])
    return [
        f"- machine: {info['cpu']}, {info['cores']} logical cores, "
        f"{info['memory_gb']} GB memory, {info['os']}",
        f"- load average at start (1, 5, 15 min): {load}"
        + (" -- a busy, shared machine: read ratios, not absolute figures"
           if info["load_average_at_start"][0] > 0.5 * (info["cores"] or 1) else ""),
        f"- python {v['python']}, numpy {v['numpy']}, onnxruntime {v['onnxruntime']}, "
        f"TensorFlow {v['tensorflow']}",
    ]


# --- the weights under test ------------------------------------------------------------

@dataclass
class Weights:
    checkpoint: Path
    int8_dir: Path
    fp32_dir: Path
    dims: dict  # vocab_size, embed_dim, hidden_dim
    origin: str  # how the checkpoint came to be


def shipped_dims() -> dict[str, int]:
    manifest = json.loads((SHIPPED_MODEL / "manifest.json").read_text(encoding="utf-8"))
    return {k: int(manifest["dims"][k]) for k in ("vocab_size", "embed_dim", "hidden_dim")}


def train_small_checkpoint(out: Path, dims: dict[str, int], steps: int) -> str:
    """A checkpoint with the given dimensions after a few steps (weights only change what
    the replies say). The shared corpus fills a 12k vocabulary; the demo corpus is the
    fallback (its vocabulary is smaller: noted in the results)."""
    from training.environment import configure_tensorflow_environment

    configure_tensorflow_environment()
    from training.config import TrainConfig
    from training.train import train

    corpus = SHARED_CORPUS if SHARED_CORPUS.is_file() else DEMO_CORPUS
    config = TrainConfig(embed_dim=dims["embed_dim"], hidden_dim=dims["hidden_dim"],
                         vocab_size=dims["vocab_size"], min_freq=1, batch_size=32,
                         max_steps=steps, epochs=1, valid_max=200, progress=False,
                         checkpoint_every=10_000, seed=1)
    train(config, corpora=[corpus], out=out)
    return (f"trained {steps} steps on {corpus.name} (embed {dims['embed_dim']}, "
            f"hidden {dims['hidden_dim']}, vocab at most {dims['vocab_size']})")


def prepare_weights(workdir: Path, checkpoint: Path | None, dims: dict[str, int] | None = None,
                    train_steps: int = 5) -> Weights:
    """The checkpoint and its int8/fp32 exports, made once per work folder (reused after)."""
    from training.environment import configure_tensorflow_environment

    configure_tensorflow_environment()
    workdir.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        origin = f"the checkpoint {checkpoint.name} given with --checkpoint"
    else:
        checkpoint = workdir / "checkpoint"
        note = workdir / "checkpoint.origin"
        if not (checkpoint / "config.json").is_file() or not (
                checkpoint / "model.weights.h5").is_file():
            dims = dims or shipped_dims()
            log(f"training a small checkpoint with {dims} in {checkpoint} ...")
            shutil.rmtree(checkpoint, ignore_errors=True)
            note.write_text(train_small_checkpoint(checkpoint, dims, train_steps))
        origin = note.read_text() if note.is_file() else "a checkpoint in the work folder"
    if not (checkpoint / "config.json").is_file():
        raise SystemExit(f"{checkpoint} is not a checkpoint folder (no config.json)")
    # Exports are reused only when they were made from these very weights.
    source = workdir / "exported_from"
    weights_file = checkpoint / "best.weights.h5"
    if not weights_file.is_file():
        weights_file = checkpoint / "model.weights.h5"
    if not weights_file.is_file():
        raise SystemExit(f"{checkpoint} has no weights (model.weights.h5)")
    identity = f"{checkpoint.resolve()} {weights_file.stat().st_mtime_ns}"
    stale = not source.is_file() or source.read_text() != identity
    folders = {}
    for quantize, name in (("int8", "int8"), ("none", "fp32")):
        out = workdir / f"model-{name}"
        folders[name] = out
        if stale or not (out / "manifest.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            from export import export_model

            log(f"exporting {name} to {out} ...")
            export_model(checkpoint, out, quantize=quantize, check_samples=10, weights="best")
    source.write_text(identity)
    manifest = json.loads((folders["int8"] / "manifest.json").read_text(encoding="utf-8"))
    return Weights(checkpoint, folders["int8"], folders["fp32"], manifest["dims"], origin)


def questions_of(checkpoint: Path, limit: int) -> list[str]:
    lines = (checkpoint / "valid.tsv").read_text(encoding="utf-8").splitlines()
    questions = [line.split("\t", 1)[0] for line in lines if line.strip()]
    return questions[:limit] or ["你好"]


# --- results ---------------------------------------------------------------------------

def write_results(out_dir: Path, name: str, markdown: str, data: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{name}.md", out_dir / f"{name}.json"
    md.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    js.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n",
                  encoding="utf-8")
    log(f"wrote {md} and {js}")
    return md, js


def stat_cpu_seconds(stat_file: str | Path) -> float | None:
    """User + system CPU seconds in a /proc ``stat`` file (a process's or a thread's);
    None when it is gone."""
    try:
        fields = Path(stat_file).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def proc_mb(pid: int, file: str, field: str) -> float | None:
    """A size in /proc/PID/FILE (``status``, ``smaps_rollup``: "Field:  N kB"), in MB;
    None when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb(pid: int) -> float | None:
    return proc_mb(pid, "status", "VmHWM")


def pss_mb(pid: int) -> float | None:
    """Its proportional set size now (the pages it shares split among their users)."""
    return proc_mb(pid, "smaps_rollup", "Pss")


def child_pids(pid: int) -> list[int]:
    """The processes ``pid`` started (xiaoX's engine process, when it has one)."""
    found = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:  # it has ended
        return []
    for tid in threads:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return found


def event_loop_name() -> str:
    """The event loop the server runs (uvicorn takes uvloop when it is installed), which
    the in-process benchmarks run too."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run_loop(main):
    """``asyncio.run(main)`` on the server's event loop (``event_loop_name``)."""
    if event_loop_name() == "uvloop":
        import uvloop

        return uvloop.run(main)
    import asyncio

    return asyncio.run(main)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
