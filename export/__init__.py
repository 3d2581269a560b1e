"""``python -m export``: a training checkpoint -> a servable ONNX model folder."""

from export.export import ExportError, export_model

__all__ = ["ExportError", "export_model"]
