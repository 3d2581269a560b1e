"""``python -m export``: a training checkpoint -> a servable ONNX model folder."""

from __future__ import annotations

from typing import Any

__all__ = ["ExportError", "export_model"]


def __getattr__(name: str) -> Any:
    # Lazy: ``export.reply_index`` (numpy, jieba, bm25s) must not pull TensorFlow in.
    if name in __all__:
        from export import export as _export

        return getattr(_export, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
