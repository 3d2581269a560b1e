"""Turn a checkpoint folder into a model folder, in phases: graphs -> quantize -> checks ->
reply index -> manifest.

With a backward checkpoint in ``CHECKPOINT/backward/`` (trained answer -> question on the
same vocabulary), its scoring graph ships as ``backward_score.onnx``: serving only ever
scores log p(message | reply) with it, so its encoder and decoder stay behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.checks import (
    ScoreBatch,
    batch_sources,
    compare,
    compare_scores,
    onnx_functions,
    onnx_score_function,
    score_batch,
    tensorflow_score_function,
)
from export.graphs import (
    DEFAULT_OPSET,
    decoder_function,
    encoder_function,
    export_graphs,
    quantize_int8,
    score_function,
)
from serve.runtime.blocklist import BLOCKLIST_FILE, Blocklist, BlocklistError
from serve.runtime.manifest import (
    BACKWARD_SCORE_FILE,
    DECODER_FILE,
    ENCODER_FILE,
    FORMAT_VERSION,
    INDEX_DIR,
    MANIFEST_FILE,
    SCORE_FILE,
    Manifest,
)
from serve.runtime.paths import DEFAULT_BLOCKLIST
from serve.runtime.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, VOCAB_FILE, Tokenizer

log = logging.getLogger("export")

CHECKPOINT_FORMAT_VERSION = 1
BACKWARD_DIR = "backward"  # CHECKPOINT/backward/: the answer -> question model
MAX_FP32_LOG_PROB_DIFF = 1e-4
MAX_FP32_SUM_DIFF = 1e-3  # a reply's summed log-prob, graph vs steps (up to ~30 tokens)
SCORE_CHECK_PAIRS = 48  # [B,T,V] log-probs in memory at once: keep the batch modest
MAX_FOLDER_BYTES = 30 * 1024 * 1024  # an int8 model folder, index included
FORWARD_GRAPHS = (ENCODER_FILE, DECODER_FILE, SCORE_FILE)


class ExportError(Exception):
    """A checkpoint that cannot be exported, or an export that failed its own checks."""


@dataclass
class _Loaded:
    """One checkpoint loaded with TensorFlow: the forward model or the backward one."""

    path: Path
    model: Any
    tokenizer: Tokenizer
    config: dict

    def limit(self, key: str) -> int:
        return int(self.config.get("train", {}).get(key, 30))


def _load(checkpoint_dir: Path, weights: str) -> _Loaded:
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
        return _Loaded(checkpoint_dir, *load_checkpoint(checkpoint_dir, weights=weights))
    except Exception as e:  # noqa: BLE001 - any failure to load is the same user error
        raise ExportError(f"{checkpoint_dir}: cannot load the checkpoint ({e})") from e


def _load_backward(forward: _Loaded, weights: str) -> _Loaded | None:
    """CHECKPOINT/backward/ when present; refused unless it reads the forward's vocabulary
    (its scores are added to the forward's over the same token ids)."""
    path = forward.path / BACKWARD_DIR
    if not path.is_dir():
        return None
    backward = _load(path, weights)
    direction = backward.config.get("direction", backward.config.get("train", {}).get("direction"))
    if direction != "backward":
        raise ExportError(f"{path}: config.json says direction {direction!r}, not 'backward'")
    if backward.tokenizer.vocab.tokens != forward.tokenizer.vocab.tokens:
        raise ExportError(f"{path}: its vocab.txt differs from the forward model's")
    if backward.tokenizer.settings != forward.tokenizer.settings:
        raise ExportError(f"{path}: its tokenizer settings differ from the forward model's")
    return backward


def _held_out_pairs(checkpoint_dir: Path, limit: int) -> list[tuple[str, str]]:
    path = checkpoint_dir / "valid.tsv"
    if not path.is_file():
        raise ExportError(f"{checkpoint_dir}: no valid.tsv (held-out pairs) to check the export on")
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        question, _, answer = line.partition("\t")
        if question.strip():
            pairs.append((question, answer))
    if not pairs:
        raise ExportError(f"{path}: no held-out pairs to check the export on")
    return pairs[:limit]


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


# -- phase 1: graphs ---------------------------------------------------------------------


def _export_fp32(forward: _Loaded, backward: _Loaded | None, fp32_dir: Path, opset: int) -> None:
    """fp32 graphs: fp32_dir/{encoder,decoder,score}.onnx, the backward's in fp32_dir/backward/
    (its encoder and decoder only serve the step-sum check)."""
    fp32_dir.mkdir(parents=True)
    export_graphs(forward.model, fp32_dir, opset)
    if backward is not None:
        (fp32_dir / BACKWARD_DIR).mkdir()
        export_graphs(backward.model, fp32_dir / BACKWARD_DIR, opset)


# -- phase 2: quantize -------------------------------------------------------------------


def _quantize(fp32_dir: Path, int8_dir: Path, with_backward: bool) -> None:
    int8_dir.mkdir(parents=True)
    for graph in FORWARD_GRAPHS:
        quantize_int8(fp32_dir / graph, int8_dir / graph)
    if with_backward:  # only the backward scoring graph ships
        (int8_dir / BACKWARD_DIR).mkdir()
        quantize_int8(fp32_dir / BACKWARD_DIR / SCORE_FILE, int8_dir / BACKWARD_DIR / SCORE_FILE)


# -- phase 3: checks ---------------------------------------------------------------------


def _check_scoring(side: _Loaded, fp32_dir: Path, batch: ScoreBatch) -> dict:
    """fp32 scoring graph vs TensorFlow's call (per token) and vs the decoder steps (sums)."""
    result = compare_scores(
        onnx_score_function(fp32_dir / SCORE_FILE),
        batch,
        tensorflow=tensorflow_score_function(score_function(side.model)),
        steps=onnx_functions(fp32_dir),
    )
    if (
        result["max_abs_token_diff_vs_tensorflow"] > MAX_FP32_LOG_PROB_DIFF
        or result["max_abs_sum_diff_vs_steps"] > MAX_FP32_SUM_DIFF
    ):
        raise ExportError(f"{side.path.name}: the fp32 scoring graph disagrees: {result}")
    return result


@dataclass
class _CheckInputs:
    """What the checks feed the graphs: held-out sources (greedy) and score batches."""

    src_ids: np.ndarray
    src_len: np.ndarray
    max_len: int
    scores: dict[str, ScoreBatch]  # "score" (forward) and "backward_score" -> batch


def _check_inputs(
    forward: _Loaded, backward: _Loaded | None, pairs: list[tuple[str, str]]
) -> _CheckInputs:
    tok, src_max, tgt_max = (
        forward.tokenizer,
        forward.limit("max_src_len"),
        forward.limit("max_tgt_len"),
    )
    src_ids, src_len = batch_sources(tok, [q for q, _ in pairs], src_max)
    few = pairs[:SCORE_CHECK_PAIRS]
    scores = {"score": score_batch(tok, few, src_max, tgt_max)}
    if backward is not None:  # the backward model reads the reply and scores the message
        scores["backward_score"] = score_batch(
            tok,
            [(a, q) for q, a in few],
            backward.limit("max_src_len"),
            backward.limit("max_tgt_len"),
        )
    return _CheckInputs(src_ids, src_len, tgt_max + 1, scores)


def _check_fp32(
    forward: _Loaded, backward: _Loaded | None, fp32_dir: Path, inputs: _CheckInputs
) -> dict:
    """Parity of every fp32 graph with TensorFlow (and of scores with steps); raises on failure."""
    tensorflow_fns = (encoder_function(forward.model), decoder_function(forward.model))
    fp32 = compare(
        tensorflow_fns, onnx_functions(fp32_dir), inputs.src_ids, inputs.src_len, inputs.max_len
    )
    if fp32["max_abs_log_prob_diff"] > MAX_FP32_LOG_PROB_DIFF or not fp32["greedy_identical"]:
        raise ExportError(f"fp32 ONNX disagrees with TensorFlow: {fp32}")
    checks: dict[str, Any] = {"fp32_vs_tensorflow": fp32}
    checks["score"] = _check_scoring(forward, fp32_dir, inputs.scores["score"])
    if backward is not None:
        checks["backward_score"] = _check_scoring(
            backward, fp32_dir / BACKWARD_DIR, inputs.scores["backward_score"]
        )
    checks["mean_source_tokens"] = float(np.mean(inputs.src_len))
    return checks


def _check_int8(fp32_dir: Path, int8_dir: Path, inputs: _CheckInputs, checks: dict) -> None:
    """int8 vs fp32, recorded (quantization moves log-probs; the figures say by how much)."""
    checks["int8_vs_fp32"] = compare(
        onnx_functions(fp32_dir),
        onnx_functions(int8_dir),
        inputs.src_ids,
        inputs.src_len,
        inputs.max_len,
    )
    for key, sub in (("score", "."), ("backward_score", BACKWARD_DIR)):
        if key in inputs.scores:
            checks[key]["int8"] = compare_scores(
                onnx_score_function(int8_dir / sub / SCORE_FILE),
                inputs.scores[key],
                fp32=onnx_score_function(fp32_dir / sub / SCORE_FILE),
            )


# -- phase 4: the folder and its reply index ---------------------------------------------


def _replace(target: Path, source: Path | None) -> None:
    """Copy ``source`` to ``target``, or remove a stale ``target`` when there is no source
    (the manifest hashes whatever the folder holds)."""
    if source is not None:
        shutil.copyfile(source, target)
    elif target.exists():
        target.unlink()


def _install(
    final_dir: Path, out_dir: Path, checkpoint_dir: Path, blocklist: Path | None, backward: bool
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for graph in FORWARD_GRAPHS:
        shutil.copyfile(final_dir / graph, out_dir / graph)
    _replace(
        out_dir / BACKWARD_SCORE_FILE, final_dir / BACKWARD_DIR / SCORE_FILE if backward else None
    )
    shutil.copyfile(checkpoint_dir / VOCAB_FILE, out_dir / VOCAB_FILE)
    _replace(out_dir / BLOCKLIST_FILE, blocklist)


def _index(
    forward: _Loaded, out_dir: Path, blocklist: Path | None, enabled: bool
) -> dict[str, Any]:
    """Build the reply index from the checkpoint's train.tsv; the reason when there is none."""
    from export.reply_index import TRAIN_FILE, build_reply_index

    shutil.rmtree(out_dir / INDEX_DIR, ignore_errors=True)
    if not enabled:
        return {"skipped": "--no-index"}
    source = forward.path / TRAIN_FILE
    if not source.is_file():
        log.warning("no reply index: the checkpoint has no %s", TRAIN_FILE)
        return {"skipped": f"the checkpoint has no {TRAIN_FILE}"}
    return build_reply_index(
        source,
        out_dir / INDEX_DIR,
        forward.tokenizer,
        blocklist=Blocklist.load(blocklist) if blocklist is not None else None,
    )


def _check_blocklist(blocklist: Path | None) -> None:
    if blocklist is not None:
        try:
            Blocklist.load(blocklist)
        except BlocklistError as e:
            raise ExportError(str(e)) from e


def _folder_bytes(out_dir: Path, quantize: str) -> int:
    """The folder's weight (the manifest aside); an int8 folder over 30 MB is refused."""
    size = sum(
        p.stat().st_size for p in out_dir.rglob("*") if p.is_file() and p.name != MANIFEST_FILE
    )
    if quantize == "int8" and size > MAX_FOLDER_BYTES:
        raise ExportError(
            f"{out_dir}: {size / 2**20:.1f} MB, over the "
            f"{MAX_FOLDER_BYTES / 2**20:.0f} MB a model folder may weigh"
        )
    return size


# -- phase 5: the manifest ---------------------------------------------------------------


def _manifest(
    forward: _Loaded,
    backward: _Loaded | None,
    *,
    name: str,
    opset: int,
    quantize: str,
    weights: str,
    command: str,
) -> Manifest:
    model_cfg = forward.config["model"]
    training = _training_record(forward.path, forward.config, weights)
    training["weights"] = weights
    if backward is not None:
        training["backward"] = _training_record(backward.path, backward.config, weights)
    if command:
        training["export_command"] = command
    return Manifest(
        name=name,
        dims={
            "vocab_size": int(model_cfg["vocab_size"]),
            "embed_dim": int(model_cfg["embed_dim"]),
            "hidden_dim": int(model_cfg["hidden_dim"]),
        },
        special_ids={"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID},
        opset=opset,
        quantization=quantize,
        tokenizer=forward.config.get("tokenizer", {}),
        training=training,
        format_version=FORMAT_VERSION,
    )


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
    index: bool = True,
    tune_samples: int = 300,
) -> Manifest:
    """Export, check and write a model folder; return its manifest.

    ``weights``: "best" (best validation loss) or "latest". ``blocklist`` is copied into
    the folder: serving suppresses its words, and the reply index drops replies with one.
    ``index``: build the reply index from the checkpoint's train.tsv (skipped, and said so
    in ``manifest.retrieval``, when the file is absent). ``tune_samples``: validation pairs
    the selection weights are tuned on (export.tune; 0 = untuned defaults). Raises
    ExportError when a checkpoint is unusable, when an fp32 graph disagrees with TensorFlow
    (log-probs by more than 1e-4, a greedy reply, a reply's summed score vs the decoder
    steps by more than 1e-3), or when an int8 folder exceeds 30 MB.
    """
    if quantize not in ("none", "int8"):
        raise ExportError(f"--quantize must be none or int8, not {quantize!r}")
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    blocklist = Path(blocklist) if blocklist is not None else None
    forward = _load(checkpoint_dir, weights)
    backward = _load_backward(forward, weights)
    _check_blocklist(blocklist)
    inputs = _check_inputs(forward, backward, _held_out_pairs(checkpoint_dir, check_samples))
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        fp32_dir, final_dir = Path(tmp, "fp32"), Path(tmp, "int8")
        _export_fp32(forward, backward, fp32_dir, opset)
        checks = _check_fp32(forward, backward, fp32_dir, inputs)
        if quantize == "int8":
            _quantize(fp32_dir, final_dir, backward is not None)
            _check_int8(fp32_dir, final_dir, inputs, checks)
        else:
            final_dir = fp32_dir
        _install(final_dir, out_dir, checkpoint_dir, blocklist, backward is not None)
    retrieval = _index(forward, out_dir, blocklist, index)
    checks["export_seconds"] = round(time.monotonic() - started, 1)
    checks["folder_bytes"] = _folder_bytes(out_dir, quantize)
    manifest = _manifest(
        forward, backward, name=name or out_dir.name, opset=opset, quantize=quantize,
        weights=weights, command=command,
    )  # fmt: skip
    manifest.checks, manifest.retrieval = checks, retrieval
    manifest.write(out_dir)
    from export.tune import tune_selection

    valid_file = checkpoint_dir / "valid.tsv"
    if tune_samples and valid_file.is_file():
        manifest = tune_selection(out_dir, valid_file, tune_samples)
    return manifest
