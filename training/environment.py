"""TensorFlow's environment, set once before TensorFlow loads (training, export, benchmarks).

oneDNN's reordered float sums would break bit-exact resume, and TensorFlow's C++ log
chatter buries our own messages.
"""

from __future__ import annotations

import os

TENSORFLOW_ENVIRONMENT = {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}


def configure_tensorflow_environment() -> None:
    """Set the variables above where the caller has not set them (call before importing TF)."""
    for name, value in TENSORFLOW_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
