"""The attention seq2seq, in the spirit of the original ``embedding_attention_seq2seq``.

- a word embedding, shared by encoder and decoder by default;
- a bidirectional LSTM encoder (LSTM, not GRU: a Keras LSTM exports to ONNX's fused
  ``LSTM`` op, a GRU to a slow ``Loop``). Padding needs no masks: the backward direction
  reads each row's valid steps reversed, so every valid position is exact;
- a bridge from the masked mean of the encoder memory to the decoder's initial state;
- an LSTM decoder with Luong "general" attention (no input feeding, so training runs
  the decoder over the whole target at once) and an optionally tied output embedding.

``encode`` and ``decode_step`` are the two functions export turns into ONNX graphs; the
training forward pass ``call`` computes what a loop of ``decode_step`` computes (the step
leaves out the time axis: the same products, to float rounding; tests/training/test_model.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import keras
import tensorflow as tf
from keras import layers

NEG_INF = -1e9


@dataclass
class ModelConfig:
    vocab_size: int
    embed_dim: int = 256
    hidden_dim: int = 512  # decoder state; each encoder direction has half when bidirectional
    bidirectional: bool = True
    share_embedding: bool = True
    tie_output: bool = True
    dropout: float = 0.2

    def validate(self) -> None:
        if self.vocab_size <= 4:
            raise ValueError("vocab_size must be > 4")
        if self.embed_dim < 1 or self.hidden_dim < 2:
            raise ValueError("embed_dim and hidden_dim must be positive")
        if self.bidirectional and self.hidden_dim % 2:
            raise ValueError("hidden_dim must be even for a bidirectional encoder")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)


class Seq2Seq(keras.Model):
    def __init__(self, config: ModelConfig, **kwargs):
        super().__init__(**kwargs)
        config.validate()
        self.config = config
        c = config
        self.src_embedding = layers.Embedding(c.vocab_size, c.embed_dim, name="src_embedding")
        self.tgt_embedding = (
            self.src_embedding
            if c.share_embedding
            else layers.Embedding(c.vocab_size, c.embed_dim, name="tgt_embedding")
        )
        enc_units = c.hidden_dim // 2 if c.bidirectional else c.hidden_dim
        self.enc_fw = layers.LSTM(enc_units, return_sequences=True, name="encoder_fw")
        self.enc_bw = (
            layers.LSTM(enc_units, return_sequences=True, name="encoder_bw")
            if c.bidirectional
            else None
        )
        self.bridge = layers.Dense(2 * c.hidden_dim, activation="tanh", name="bridge")
        self.attn_keys = layers.Dense(c.hidden_dim, use_bias=False, name="attention_keys")
        self.dec_lstm = layers.LSTM(
            c.hidden_dim, return_sequences=True, return_state=True, name="decoder"
        )
        out_dim = c.embed_dim if c.tie_output else c.hidden_dim
        self.attn_combine = layers.Dense(out_dim, activation="tanh", name="attention_combine")
        self.dropout = layers.Dropout(c.dropout)
        if c.tie_output:
            self.out_bias = self.add_weight(
                shape=(c.vocab_size,), initializer="zeros", name="output_bias"
            )
            self.out_proj = None
        else:
            self.out_proj = layers.Dense(c.vocab_size, name="output_projection")

    # -- encoder ---------------------------------------------------------------------
    def encode(self, src_ids, src_len, training: bool = False):
        """src_ids [B,S] int, src_len [B] int -> memory, memory_keys [B,S,H], h0, c0 [B,H]."""
        src_len = tf.cast(src_len, tf.int32)
        x = self.dropout(self.src_embedding(src_ids), training=training)
        memory = self.enc_fw(x, training=training)
        if self.enc_bw is not None:
            x_rev = _reverse_valid(x, src_len)
            memory = tf.concat(
                [memory, _reverse_valid(self.enc_bw(x_rev, training=training), src_len)], axis=-1
            )
        mask = tf.sequence_mask(src_len, tf.shape(src_ids)[1], dtype=memory.dtype)
        memory = memory * mask[:, :, None]  # padding positions carry zeros, never garbage
        denom = tf.maximum(tf.reduce_sum(mask, axis=1, keepdims=True), 1.0)
        pooled = tf.reduce_sum(memory, axis=1) / denom
        h0, c0 = tf.split(self.bridge(pooled), 2, axis=-1)
        return memory, self.attn_keys(memory), h0, c0

    # -- attention and output, shared by training and the step ------------------------
    def _attend_and_project(self, dec_h, memory, memory_keys, src_mask, training: bool):
        """dec_h [B,T,H] -> log_probs [B,T,V], attention [B,T,S]."""
        scores = tf.einsum("bth,bsh->bts", dec_h, memory_keys)
        scores += (1.0 - src_mask[:, None, :]) * NEG_INF
        attention = tf.nn.softmax(scores, axis=-1)
        context = tf.einsum("bts,bsh->bth", attention, memory)
        combined = self.attn_combine(tf.concat([context, dec_h], axis=-1))
        combined = self.dropout(combined, training=training)
        if self.out_proj is None:
            logits = tf.einsum("bte,ve->btv", combined, self.tgt_embedding.embeddings)
            logits += self.out_bias
        else:
            logits = self.out_proj(combined)
        return tf.nn.log_softmax(logits, axis=-1), attention

    # -- training forward (teacher forcing) -------------------------------------------
    def call(self, inputs, training: bool = False):
        """(src_ids [B,S], src_len [B], tgt_in [B,T]) -> log_probs [B,T,V]."""
        src_ids, src_len, tgt_in = inputs
        memory, keys, h0, c0 = self.encode(src_ids, src_len, training=training)
        src_mask = tf.sequence_mask(src_len, tf.shape(src_ids)[1], dtype=memory.dtype)
        y = self.dropout(self.tgt_embedding(tgt_in), training=training)
        dec_h, _, _ = self.dec_lstm(y, initial_state=[h0, c0], training=training)
        log_probs, _ = self._attend_and_project(dec_h, memory, keys, src_mask, training)
        return log_probs

    # -- one decoder step (what decoder.onnx computes) --------------------------------
    def decode_step(self, prev_ids, h, c, memory, memory_keys, src_mask):
        """prev_ids [B] -> log_probs [B,V], h_out, c_out [B,H], attention [B,S].

        The LSTM cell is written out with the decoder layer's own weights (Keras gate
        order i, f, c, o) so that the exported step is plain MatMul/Add, which int8
        quantization handles well.
        """
        cell = self.dec_lstm.cell
        x = tf.gather(self.tgt_embedding.embeddings, prev_ids)  # (the layer's call adds casts)
        z = tf.matmul(x, cell.kernel) + tf.matmul(h, cell.recurrent_kernel) + cell.bias
        i, f, g, o = tf.split(z, 4, axis=-1)
        c_out = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
        h_out = tf.sigmoid(o) * tf.tanh(c_out)
        log_probs, attention = self._attend_and_project_step(h_out, memory, memory_keys,
                                                             src_mask)
        return log_probs, h_out, c_out, attention

    def _attend_and_project_step(self, h_out, memory, memory_keys, src_mask):
        """``_attend_and_project`` of one step, h_out [B,H] -> log_probs [B,V], attention
        [B,S]: the same products without the time axis. The 3-D form exports with shape
        plumbing around each product (90 onnxruntime nodes once optimized, 47 like this),
        which cost a batch-1 int8 step about a fifth of its time; the values are the same."""
        # Both products as the training pass's einsums convert (onnxruntime's FusedMatMul
        # with transB): a sum over the positions made otherwise (a plain MatMul over
        # memory [B,S,H]) rounds differently once a batch pads a row's positions, and a
        # row batched would no longer equal the row alone.
        scores = tf.matmul(h_out[:, None, :], memory_keys, transpose_b=True)[:, 0, :]
        scores += (1.0 - src_mask) * NEG_INF
        attention = tf.nn.softmax(scores, axis=-1)
        context = tf.einsum("bs,bsh->bh", attention, memory)
        combined = self.attn_combine(tf.concat([context, h_out], axis=-1))
        if self.out_proj is None:
            logits = tf.matmul(combined, self.tgt_embedding.embeddings, transpose_b=True)
            logits += self.out_bias
        else:
            logits = self.out_proj(combined)
        return tf.nn.log_softmax(logits, axis=-1), attention


def _reverse_valid(x, lengths):
    """Reverse each row's first ``lengths`` steps, leaving padding in place.

    The same as ``tf.reverse_sequence``, written as a gather on purpose: tf2onnx 1.17
    fuses reverse_sequence + LSTM into a bidirectional ONNX LSTM that gets padded rows
    wrong (the backward half differed by 7e-3 in our parity check).
    """
    steps = tf.range(tf.shape(x)[1])[None, :]
    lengths = lengths[:, None]
    index = tf.where(steps < lengths, lengths - 1 - steps, steps)
    return tf.gather(x, index, batch_dims=1)


def build_model(config: ModelConfig) -> Seq2Seq:
    """A model with its weights created (Keras builds lazily on the first call)."""
    model = Seq2Seq(config)
    src = tf.zeros([1, 3], tf.int32)
    model((src, tf.constant([3]), tf.zeros([1, 2], tf.int32)))
    return model
