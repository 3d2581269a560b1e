"""serve.web.lanes: the chat room's and the API's lanes from the settings."""

from __future__ import annotations

import pytest

from serve.runtime.lanes import Lane
from serve.web.lanes import engine_lanes, lane
from serve.web.settings import Settings, settings_from_env


def test_the_default_split_is_half_and_half():
    assert engine_lanes(Settings()) == {"chat": Lane(rows=16, queue=128),
                                        "api": Lane(rows=16, queue=128)}


def test_each_lane_has_at_least_one_row_and_place():
    small = Settings(max_batch_size=1, max_queue=1)
    assert engine_lanes(small) == {"chat": Lane(rows=1, queue=1), "api": Lane(rows=1, queue=1)}
    skewed = Settings(max_batch_size=8, max_queue=10, api_batch_share=0.25,
                      api_queue_share=0.9)
    assert engine_lanes(skewed) == {"chat": Lane(rows=6, queue=1), "api": Lane(rows=2, queue=9)}


def test_shares_are_fractions():
    for value in ("0", "1", "1.5"):
        with pytest.raises(ValueError, match="api_batch_share"):
            settings_from_env({"XIAOX_API_BATCH_SHARE": value})


def test_an_engine_without_lanes_gets_no_lane_argument():
    class Baseline:  # the TensorFlow baseline's shape: no lanes
        pass

    class Laned:
        lanes = {"chat": Lane(1, 1)}

    assert lane(Baseline(), "chat") == {}
    assert lane(Laned(), "chat") == {"lane": "chat"}
    assert lane(Laned(), "api") == {}
