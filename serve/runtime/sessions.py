"""onnxruntime sessions, configured once for serving and for export's checks."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from serve.runtime.manifest import ModelError


def ort_session(path: str | Path, intra: int = 0, inter: int = 1, *,
                memory_arena: bool = True) -> ort.InferenceSession:
    """A CPU session of ``path``; ``intra=0`` lets onnxruntime pick (one thread per core).
    ``memory_arena=False`` returns a run's memory when it ends (the arena keeps its peak:
    right for the decoder's small steady steps, wrong for a graph whose inputs vary a lot)."""
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = memory_arena
    options.intra_op_num_threads = intra
    options.inter_op_num_threads = inter
    # Several sessions (and processes) share few cores: spinning threads would steal them.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad graphs
        raise ModelError(f"{path}: onnxruntime cannot load it ({e})") from e


def run_named(session: ort.InferenceSession, outputs: tuple[str, ...], feeds: dict) -> dict:
    """Run ``session`` and bind its outputs by name (tf2onnx orders a dict's outputs
    alphabetically, so position means nothing)."""
    return dict(zip(outputs, session.run(list(outputs), feeds), strict=True))
