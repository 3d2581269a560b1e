"""Turn a checkpoint folder into a model folder: graphs, vocab, checks, manifest."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from export.checks import batch_sources, compare, onnx_functions
from export.graphs import (
    DEFAULT_OPSET,
    decoder_function,
    encoder_function,
    export_graphs,
    quantize_int8,
)
from serve.runtime.blocklist import BLOCKLIST_FILE, Blocklist, BlocklistError
from serve.runtime.manifest import DECODER_FILE, ENCODER_FILE, FORMAT_VERSION, Manifest
from serve.runtime.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, VOCAB_FILE

CHECKPOINT_FORMAT_VERSION = 1
MAX_FP32_LOG_PROB_DIFF = 1e-4
DEFAULT_BLOCKLIST = Path(__file__).resolve().parent.parent / "data" / BLOCKLIST_FILE


class ExportError(Exception):
    """A checkpoint that cannot be exported, or an export that failed its own checks."""


def _load(checkpoint_dir: Path, weights: str):
    from training.checkpoint import load_checkpoint

    config_path = checkpoint_dir / "config.json"
    if not checkpoint_dir.is_dir():
        raise ExportError(f"{checkpoint_dir}: no such checkpoint folder")
    if not config_path.is_file():
        raise ExportError(f"{checkpoint_dir}: no config.json; is this a training checkpoint?")
    try:
        version = json.loads(config_path.read_text(encoding="utf-8")).get("format_version")
    except (OSError, ValueError) as e:
        raise ExportError(f"{config_path}: unreadable ({e})") from e
    if version != CHECKPOINT_FORMAT_VERSION:
        raise ExportError(
            f"{checkpoint_dir}: checkpoint format {version!r}; "
            f"this export reads format {CHECKPOINT_FORMAT_VERSION}"
        )
    try:
        return load_checkpoint(checkpoint_dir, weights=weights)
    except Exception as e:  # noqa: BLE001 - any failure to load is the same user error
        raise ExportError(f"{checkpoint_dir}: cannot load the checkpoint ({e})") from e


def _held_out_questions(checkpoint_dir: Path, limit: int) -> list[str]:
    path = checkpoint_dir / "valid.tsv"
    if not path.is_file():
        raise ExportError(f"{checkpoint_dir}: no valid.tsv (held-out pairs) to check the export on")
    questions = [
        line.split("\t", 1)[0]
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    if not questions:
        raise ExportError(f"{path}: no held-out pairs to check the export on")
    return questions[:limit]


def _training_seconds(metrics: list[dict]) -> float | None:
    """Wall time from the first to the last metrics record (pauses between resumes included)."""
    times = [m["time"] for m in metrics if "time" in m]
    return round(times[-1] - times[0], 1) if len(times) > 1 else None


def _training_record(checkpoint_dir: Path, config: dict, weights: str = "latest") -> dict:
    metrics = []
    metrics_path = checkpoint_dir / "metrics.jsonl"
    if metrics_path.is_file():
        metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    validated = [m for m in metrics if m.get("valid_loss") is not None]
    if weights == "best" and validated:  # the figures of the weights being exported
        validated = [min(validated, key=lambda m: m["valid_loss"])]
    return {
        "model": config.get("model", {}),
        "train": config.get("train", {}),
        "corpora": config.get("corpora", []),
        "cleaning": config.get("cleaning", {}),
        "command": config.get("command", ""),
        "resumed_with": config.get("resumed_with", []),
        "metrics": validated[-1] if validated else (metrics[-1] if metrics else {}),
        "training_seconds": _training_seconds(metrics),
    }


def export_model(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    quantize: str = "int8",
    name: str | None = None,
    check_samples: int = 200,
    opset: int = DEFAULT_OPSET,
    weights: str = "best",
    blocklist: str | Path | None = DEFAULT_BLOCKLIST,
    command: str = "",
) -> Manifest:
    """Export, check and write a model folder; return its manifest.

    ``weights``: "best" (best validation loss) or "latest". ``blocklist`` is copied into
    the folder: serving suppresses its words. Raises ExportError when the checkpoint is
    unusable, or when fp32 ONNX disagrees with TensorFlow (log-probs differ by more than
    1e-4, or a greedy reply differs).
    """
    if quantize not in ("none", "int8"):
        raise ExportError(f"--quantize must be none or int8, not {quantize!r}")
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    model, tokenizer, config = _load(checkpoint_dir, weights)
    if blocklist is not None:
        try:
            Blocklist.load(blocklist)
        except BlocklistError as e:
            raise ExportError(str(e)) from e
    questions = _held_out_questions(checkpoint_dir, check_samples)
    train_cfg = config.get("train", {})
    src_ids, src_len = batch_sources(tokenizer, questions, int(train_cfg.get("max_src_len", 30)))
    max_len = int(train_cfg.get("max_tgt_len", 30)) + 1
    started = time.monotonic()

    with tempfile.TemporaryDirectory() as tmp:
        fp32_dir, int8_dir = Path(tmp, "fp32"), Path(tmp, "int8")
        fp32_dir.mkdir()
        export_graphs(model, fp32_dir, opset)
        tensorflow_fns = (encoder_function(model), decoder_function(model))
        checks = {
            "fp32_vs_tensorflow": compare(
                tensorflow_fns, onnx_functions(fp32_dir), src_ids, src_len, max_len
            )
        }
        fp32 = checks["fp32_vs_tensorflow"]
        if fp32["max_abs_log_prob_diff"] > MAX_FP32_LOG_PROB_DIFF or not fp32["greedy_identical"]:
            raise ExportError(f"fp32 ONNX disagrees with TensorFlow: {fp32}")
        final_dir = fp32_dir
        if quantize == "int8":
            int8_dir.mkdir()
            for graph in (ENCODER_FILE, DECODER_FILE):
                quantize_int8(fp32_dir / graph, int8_dir / graph)
            checks["int8_vs_fp32"] = compare(
                onnx_functions(fp32_dir), onnx_functions(int8_dir), src_ids, src_len, max_len
            )
            final_dir = int8_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        for graph in (ENCODER_FILE, DECODER_FILE):
            shutil.copyfile(final_dir / graph, out_dir / graph)
    shutil.copyfile(checkpoint_dir / VOCAB_FILE, out_dir / VOCAB_FILE)
    stale_blocklist = out_dir / BLOCKLIST_FILE
    if blocklist is not None:
        shutil.copyfile(blocklist, out_dir / BLOCKLIST_FILE)
    elif stale_blocklist.exists():
        stale_blocklist.unlink()
    checks["export_seconds"] = round(time.monotonic() - started, 1)
    checks["mean_source_tokens"] = float(np.mean(src_len))

    model_cfg = config["model"]
    manifest = Manifest(
        name=name or out_dir.name,
        dims={
            "vocab_size": int(model_cfg["vocab_size"]),
            "embed_dim": int(model_cfg["embed_dim"]),
            "hidden_dim": int(model_cfg["hidden_dim"]),
        },
        special_ids={"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID},
        opset=opset,
        quantization=quantize,
        tokenizer=config.get("tokenizer", {}),
        training=_training_record(checkpoint_dir, config, weights),
        checks=checks,
        format_version=FORMAT_VERSION,
    )
    manifest.training["weights"] = weights
    if command:
        manifest.training["export_command"] = command
    manifest.write(out_dir)
    return manifest
