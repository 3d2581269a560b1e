"""The two ONNX graphs: the encoder, and one decoder step with attention.

Each is a ``tf.function`` with a fixed input signature (dynamic batch and source
length) converted by ``tf2onnx.convert.from_function``; ``from_keras`` breaks on some
Keras 3 models. Names follow serve.runtime.manifest's contract.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import tensorflow as tf
import tf2onnx

from serve.runtime.manifest import DECODER_OUTPUTS, ENCODER_OUTPUTS
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


def export_graphs(model: Seq2Seq, out_dir: Path, opset: int = DEFAULT_OPSET) -> tuple[Path, Path]:
    """Write fp32 encoder.onnx and decoder.onnx into out_dir."""
    encoder_path, decoder_path = out_dir / "encoder.onnx", out_dir / "decoder.onnx"
    convert(encoder_function(model), encoder_path, opset)
    convert(decoder_function(model), decoder_path, opset)
    return encoder_path, decoder_path


def quantize_int8(src: Path, dst: Path) -> None:
    """onnxruntime dynamic int8 quantization of MatMul, Gather and the fused LSTM."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gather", "LSTM"],
    )
