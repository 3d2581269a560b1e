"""glibc's allocator told to map big blocks (``serve.runtime.allocator``)."""

from __future__ import annotations

import platform

import pytest

from serve.runtime.allocator import give_back_big_blocks


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_the_mmap_threshold_is_fixed_once():
    assert give_back_big_blocks() is True
    assert give_back_big_blocks() is True  # idempotent


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_a_per_step_array_is_not_page_faulted_in_again_each_time():
    # With only the mmap threshold fixed, glibc's trim threshold stayed at 128 KB: each
    # freed batch-32 row of log-probs went back to the system and came back page-faulted
    # (14x slower than the copy itself). Minor page faults counted over 200 such copies.
    import resource

    import numpy as np

    assert give_back_big_blocks() is True
    rows = np.ones((32, 12000), np.float32)  # 1.5 MB, below the mmap threshold
    for _ in range(5):
        rows.copy()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(200):
        rows.copy()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 200
