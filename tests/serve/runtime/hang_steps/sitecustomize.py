"""Test fault injection for the engine's process (on PYTHONPATH only in the test that
wants it): with ``XIAOX_TEST_HANG_STEPS`` naming a file that does not exist yet, the third
decoder step makes it and then blocks for good, as a step thread that hangs while its
process's event loop runs. The file stops the next process from hanging."""

import os
import threading
from pathlib import Path

_marker = os.environ.get("XIAOX_TEST_HANG_STEPS")
if _marker and not Path(_marker).exists():
    from serve.runtime.model import OnnxSeq2Seq

    _step, _calls = OnnxSeq2Seq.step, []

    def _hanging_step(self, *args, **kwargs):
        _calls.append(1)
        if len(_calls) >= 3:
            Path(_marker).touch()
            threading.Event().wait()  # forever (releases the GIL, as a stuck kernel would)
        return _step(self, *args, **kwargs)

    OnnxSeq2Seq.step = _hanging_step
