"""Export's last phase: the selection weights, tuned on the checkpoint's validation pairs.

The model folder is loaded as the server loads it (onnxruntime, the reply index, the
scoring graphs); its default generation settings make the candidates; the weights go into
the manifest (``selection``, ``generation``). See ``serve.runtime.tuning``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from serve.runtime.evaluate import read_pairs
from serve.runtime.manifest import Manifest
from serve.runtime.model import OnnxSeq2Seq
from serve.runtime.options import DEFAULT_GENERATION, DecodingOptions
from serve.runtime.replies import ReplySources
from serve.runtime.tuning import tune_on_pairs

log = logging.getLogger("export")
TUNING_SEED = 1234  # the candidates' sampling seed while tuning


def tune_selection(out_dir: Path, valid_file: Path, samples: int) -> Manifest:
    """Write ``generation`` and, where the folder has something to choose among (an
    index, or a backward model), the tuned ``selection`` into the folder's manifest."""
    model = OnnxSeq2Seq.load(out_dir, intra_op_num_threads=1)
    manifest = model.manifest
    manifest.generation = dict(DEFAULT_GENERATION)
    sources = ReplySources.load(model, intra_op_num_threads=1)
    if sources.scorer is not None and (sources.index is not None or sources.scorer.has_backward):
        pairs = [(p.question, p.answer) for p in read_pairs(valid_file, samples)]
        options = DecodingOptions(**manifest.generation, seed=TUNING_SEED)
        weights = tune_on_pairs(model, sources, pairs, options,
                                chosen_on=f"{valid_file.name}, {len(pairs)} pairs")
        manifest.selection = weights.to_dict()
        log.info("selection weights: %s", manifest.selection)
    manifest.write(out_dir, hash_files=False)  # no file changed: the hashes stand
    return manifest
