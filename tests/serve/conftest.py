"""Fixtures of the serve tests: the shipped model, which loads without TensorFlow."""

import pytest

from serve.runtime.model import OnnxSeq2Seq


@pytest.fixture(scope="session")
def model(model_dir) -> OnnxSeq2Seq:
    return OnnxSeq2Seq.load(model_dir, intra_op_num_threads=1)
