"""How many shards a worker holds: enough queued work for cheap shards, never past its limit."""

from __future__ import annotations

import pytest

from pool.dispatcher import Limits, room


@pytest.mark.parametrize(
    "shard_seconds, shards_done, limits, expected",
    [
        (0.0, 0, Limits(), 2),  # nothing measured yet: one running, one queued
        (0.250, 0, Limits(), 2),  # MobileNetV2-sized shards: two are plenty
        (0.001, 0, Limits(), 6),  # 1 ms shards: 5 ms queued, plus the running one
        (0.00001, 0, Limits(), 16),  # tiny shards: capped at max_depth
        (0.001, 3, Limits(max_shards_per_worker=4), 1),  # one shard left before recycling
        (0.250, 4, Limits(max_shards_per_worker=4), 0),  # retiring: takes nothing more
    ],
)
def test_room(shard_seconds, shards_done, limits, expected):
    assert room(limits, shard_seconds, shards_done) == expected
