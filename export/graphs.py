"""The ONNX graphs: the encoder, one decoder step with attention, and the scoring pass.

The scoring graph is the teacher-forced forward pass (``Seq2Seq.call``): it scores whole
candidate replies, a batch of them in one onnxruntime call (the decoder has no input
feeding, so the whole target runs through one fused LSTM op plus batched attention).

Each is a ``tf.function`` with a fixed input signature (dynamic batch and source
length) converted by ``tf2onnx.convert.from_function``; ``from_keras`` breaks on some
Keras 3 models. Names follow serve.runtime.manifest's contract.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import tensorflow as tf
import tf2onnx

from serve.runtime.manifest import (
    DECODER_FILE,
    DECODER_OUTPUTS,
    ENCODER_FILE,
    ENCODER_OUTPUTS,
    SCORE_FILE,
    SCORE_OUTPUTS,
)
from serve.runtime.tokenizer import BOS_ID
from training.model import Seq2Seq

DEFAULT_OPSET = 17
FORBIDDEN_OPS = ("Loop", "Scan")  # a recurrent loop in the graph means a slow, unquantized path


def encoder_function(model: Seq2Seq) -> tf.types.experimental.GenericFunction:
    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.int64, name="src_ids"),
            tf.TensorSpec([None], tf.int64, name="src_len"),
        ]
    )
    def encoder(src_ids, src_len):
        return dict(zip(ENCODER_OUTPUTS, model.encode(src_ids, src_len), strict=True))

    return encoder


def decoder_function(model: Seq2Seq) -> tf.types.experimental.GenericFunction:
    hidden = model.config.hidden_dim

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.int64, name="prev_ids"),
            tf.TensorSpec([None, hidden], tf.float32, name="h"),
            tf.TensorSpec([None, hidden], tf.float32, name="c"),
            tf.TensorSpec([None, None, hidden], tf.float32, name="memory"),
            tf.TensorSpec([None, None, hidden], tf.float32, name="memory_keys"),
            tf.TensorSpec([None, None], tf.float32, name="src_mask"),
        ]
    )
    def decoder(prev_ids, h, c, memory, memory_keys, src_mask):
        outputs = model.decode_step(prev_ids, h, c, memory, memory_keys, src_mask)
        return dict(zip(DECODER_OUTPUTS, outputs, strict=True))

    return decoder


def score_function(model: Seq2Seq) -> tf.types.experimental.GenericFunction:
    """(src_ids, src_len, tgt_ids, tgt_len) -> token_log_probs [B,T], 0 at padding."""

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.int64, name="src_ids"),
            tf.TensorSpec([None], tf.int64, name="src_len"),
            tf.TensorSpec([None, None], tf.int64, name="tgt_ids"),
            tf.TensorSpec([None], tf.int64, name="tgt_len"),
        ]
    )
    def score(src_ids, src_len, tgt_ids, tgt_len):
        # The decoder reads <s> then the target shifted right, as in training.
        bos = tf.fill([tf.shape(tgt_ids)[0], 1], tf.constant(BOS_ID, tf.int64))
        tgt_in = tf.concat([bos, tgt_ids[:, :-1]], axis=1)
        log_probs = model((src_ids, src_len, tgt_in), training=False)  # [B,T,V]
        picked = tf.gather(log_probs, tgt_ids, batch_dims=2)  # [B,T]
        mask = tf.sequence_mask(tgt_len, tf.shape(tgt_ids)[1], dtype=picked.dtype)
        return dict(zip(SCORE_OUTPUTS, [picked * mask], strict=True))

    return score


def forbidden_ops(graph: onnx.ModelProto) -> list[str]:
    """Op types of FORBIDDEN_OPS found anywhere in the graph (subgraphs included)."""
    found = []

    def walk(g: onnx.GraphProto) -> None:
        for node in g.node:
            if node.op_type in FORBIDDEN_OPS:
                found.append(node.op_type)
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(graph.graph)
    return found


def convert(function, path: Path, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Convert one tf.function to ONNX at ``path``, refusing graphs with a Loop."""
    graph, _ = tf2onnx.convert.from_function(
        function, input_signature=function.input_signature, opset=opset, output_path=str(path)
    )
    bad = forbidden_ops(graph)
    if bad:
        raise RuntimeError(
            f"{path.name} contains {sorted(set(bad))}: the export must stay loop-free"
        )
    return graph


def export_graphs(
    model: Seq2Seq, out_dir: Path, opset: int = DEFAULT_OPSET, *, score_name: str = SCORE_FILE
) -> tuple[Path, Path, Path]:
    """Write fp32 encoder.onnx, decoder.onnx and the scoring graph ``score_name`` into out_dir."""
    paths = out_dir / ENCODER_FILE, out_dir / DECODER_FILE, out_dir / score_name
    for function, path in zip(
        (encoder_function(model), decoder_function(model), score_function(model)),
        paths,
        strict=True,
    ):
        convert(function, path, opset)
    return paths


def quantize_int8(src: Path, dst: Path) -> None:
    """onnxruntime dynamic int8 quantization of MatMul, Gather and the fused LSTM."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gather", "LSTM"],
    )
