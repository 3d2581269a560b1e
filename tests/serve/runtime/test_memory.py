"""glibc's allocator told to map big blocks (``serve.runtime.allocator``)."""

from __future__ import annotations

import platform

import pytest

from serve.runtime.allocator import give_back_big_blocks


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_the_mmap_threshold_is_fixed_once():
    assert give_back_big_blocks() is True
    assert give_back_big_blocks() is True  # idempotent
