"""The model folder's ``manifest.json``: what export writes and serving trusts.

One folder holds ``encoder.onnx``, ``decoder.onnx``, ``vocab.txt`` and this manifest, and
optionally ``score.onnx``, ``backward_score.onnx`` and the reply index ``index/``.
The manifest names every file (subfolders included, as ``index/...``) with its sha256, so
a half-copied or edited model is refused with a clear error instead of answering nonsense.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
SCORE_FILE = "score.onnx"  # the teacher-forced pass: log p(reply | message), optional
BACKWARD_SCORE_FILE = "backward_score.onnx"  # the backward model's: log p(message | reply)
INDEX_DIR = "index"  # the reply index (serve.runtime.retrieval), optional

# The graphs' contract, bound by name (ONNX orders dict outputs alphabetically).
ENCODER_INPUTS = ("src_ids", "src_len")
ENCODER_OUTPUTS = ("memory", "memory_keys", "h0", "c0")
DECODER_INPUTS = ("prev_ids", "h", "c", "memory", "memory_keys", "src_mask")
DECODER_OUTPUTS = ("log_probs", "h_out", "c_out", "attention")
# tgt_ids: the reply's tokens then </s>, padded with <pad>; tgt_len counts </s>.
# token_log_probs [B,T]: log p(tgt_ids[t] | source, tgt_ids[:t]), 0 at padding.
SCORE_INPUTS = ("src_ids", "src_len", "tgt_ids", "tgt_len")
SCORE_OUTPUTS = ("token_log_probs",)


class ModelError(Exception):
    """A model folder that cannot be served: missing, corrupt or of another format."""


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Manifest:
    name: str
    dims: dict[str, int]  # vocab_size, embed_dim, hidden_dim, ...
    special_ids: dict[str, int]  # pad, unk, bos, eos
    opset: int
    quantization: str  # "none" or "int8"
    tokenizer: dict[str, Any]  # serve.runtime.tokenizer.TokenizerSettings as a dict
    files: dict[str, str] = field(default_factory=dict)  # relative name -> sha256
    training: dict[str, Any] = field(default_factory=dict)  # config, metrics, corpora, commands
    checks: dict[str, Any] = field(default_factory=dict)  # export's parity results
    # the reply index: counts per filter, pairs indexed, k1/b, tokenizer, source file
    retrieval: dict[str, Any] = field(default_factory=dict)
    # serve.runtime.selection.SelectionWeights, tuned on the validation pairs
    selection: dict[str, Any] = field(default_factory=dict)
    # the folder's default DecodingOptions (the chat room's), like Hugging Face's
    # generation_config.json
    generation: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=2, sort_keys=True) + "\n"

    def write(self, model_dir: str | Path, *, hash_files: bool = True) -> Path:
        """Write the manifest, hashing every other file of the folder first (those of
        subfolders too, named by their relative POSIX path, e.g. ``index/params.json``)."""
        model_dir = Path(model_dir)
        if hash_files:
            self.files = {
                p.relative_to(model_dir).as_posix(): sha256_of(p)
                for p in sorted(model_dir.rglob("*"))
                if p.is_file() and p.relative_to(model_dir).as_posix() != MANIFEST_FILE
            }
        path = model_dir / MANIFEST_FILE
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def read(cls, model_dir: str | Path) -> Manifest:
        path = Path(model_dir) / MANIFEST_FILE
        if not path.is_file():
            raise ModelError(f"{model_dir}: no {MANIFEST_FILE}; is this an exported model folder?")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{path}: unreadable manifest ({e})") from e
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelError(
                f"{path}: format version {version!r}, this xiaoX reads version {FORMAT_VERSION}"
            )
        try:
            return cls(**data)
        except TypeError as e:
            raise ModelError(f"{path}: malformed manifest ({e})") from e

    def verify(self, model_dir: str | Path) -> None:
        """Check that every listed file exists and has its recorded sha256."""
        model_dir = Path(model_dir)
        for required in (ENCODER_FILE, DECODER_FILE, "vocab.txt"):
            if required not in self.files:
                raise ModelError(f"{model_dir}: the manifest does not list {required}")
        for name, expected in self.files.items():
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ModelError(f"{model_dir}: the manifest names a file outside it: {name}")
            path = model_dir / name
            if not path.is_file():
                raise ModelError(f"{model_dir}: {name} is missing")
            actual = sha256_of(path)
            if actual != expected:
                raise ModelError(
                    f"{model_dir}: {name} has sha256 {actual[:12]}…, "
                    f"the manifest says {expected[:12]}…; the file is corrupt or was replaced"
                )


def portable_command(program: str, argv: list[str]) -> str:
    """A command line fit for a manifest: absolute paths reduced to their names, so that no
    path of the machine that trained or exported the model is recorded."""

    def clean(arg: str) -> str:
        if arg.startswith("--") and "=" in arg:
            key, _, value = arg.partition("=")
            return f"{key}={clean(value)}"
        return Path(arg).name if Path(arg).is_absolute() else arg

    return " ".join([program, *(clean(a) for a in argv)])


def load_manifest(model_dir: str | Path, *, verify: bool = True) -> Manifest:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: no such model folder")
    manifest = Manifest.read(model_dir)
    if verify:
        manifest.verify(model_dir)
    return manifest
