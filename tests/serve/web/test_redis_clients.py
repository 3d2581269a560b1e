"""Which Redis errors the broker retries (and then answers 503), and which it does not."""

from __future__ import annotations

import pytest
from redis.asyncio.sentinel import MasterNotFoundError, SlaveNotFoundError
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    DataError,
    MasterDownError,
    ReadOnlyError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from serve.web.redis_clients import NotReplicated, connect, is_transient
from serve.web.redis_url import parse_redis_url


@pytest.mark.parametrize("error", [
    RedisConnectionError("Connection refused"), RedisTimeoutError("Timeout reading"),
    ConnectionResetError(), MasterNotFoundError("No master found for 'xiaox'"),
    SlaveNotFoundError("No slave found"), BusyLoadingError("LOADING"),
    ReadOnlyError("You can't write against a read only replica."),
    ClusterDownError("The cluster is down"), MasterDownError("MASTERDOWN"),
    TryAgainError("TRYAGAIN Multiple keys request during rehashing of slot"),
    SlotNotCoveredError("slot 5 not covered"), NotReplicated("0 of 1 replicas"),
    ResponseError("NOREPLICAS Not enough good replicas to write."),
])
def test_a_failover_or_an_outage_is_transient(error):
    assert is_transient(error)


@pytest.mark.parametrize("error", [
    ResponseError("ERR wrong number of arguments"), DataError("Invalid input"),
    ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    ValueError("a bug"), KeyError("data"),
])
def test_a_bad_command_or_a_bug_is_not_retried(error):
    assert not is_transient(error)


async def test_each_form_gets_its_clients_without_connecting():
    for url, kind in [("redis://127.0.0.1:1/0", "Redis"),
                      ("redis+sentinel://127.0.0.1:1,127.0.0.1:2/xiaox/0", "Redis"),
                      ("redis+cluster://127.0.0.1:1", "RedisCluster")]:
        clients = connect(parse_redis_url(url))
        assert type(clients.commands).__name__ == kind
        assert clients.cluster == (kind == "RedisCluster")
        await clients.aclose()
