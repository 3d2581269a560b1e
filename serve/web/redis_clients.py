"""The broker's Redis clients for each URL form, and which Redis errors are worth retrying.

Two clients each time: ``commands`` (writes, history, rate limits: the primary) and
``delivery`` (the live reader: under Sentinel a replica, so that an event reaches SSE
clients only once a replica holds it, and a failover cannot take back what they saw).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serve.web.redis_url import CLUSTER, SENTINEL, RedisTarget

# What a failover, a resharding or a restart looks like from the client: all of these pass.
_TRANSIENT_REPLIES = ("READONLY", "NOREPLICAS", "MASTERDOWN", "LOADING", "TRYAGAIN",
                      "CLUSTERDOWN", "UNBLOCKED", "NOTBUSY")


class NotReplicated(Exception):
    """A message write that no replica acknowledged in time (retried, then a 503)."""


def is_transient(error: BaseException) -> bool:
    """True for errors that a retry after a short wait can cure (Redis down, a failover
    in progress, a cluster resharding); False for our bugs and bad commands."""
    from redis.exceptions import (
        ClusterDownError,
        ClusterError,
        ReadOnlyError,
        ResponseError,
        SlotNotCoveredError,
        TryAgainError,
    )
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    if isinstance(error, (RedisConnectionError, RedisTimeoutError, OSError, NotReplicated,
                          ClusterDownError, TryAgainError, ClusterError,
                          SlotNotCoveredError, ReadOnlyError)):
        # MasterNotFoundError and BusyLoadingError are ConnectionErrors; ReadOnlyError:
        # the node we still hold a connection to was demoted to a replica.
        return True
    # NOREPLICAS (min-replicas-to-write) and the like come as plain ResponseErrors.
    return isinstance(error, ResponseError) and str(error).startswith(_TRANSIENT_REPLIES)


@dataclass
class RedisClients:
    commands: Any
    delivery: Any
    cluster: bool = False
    sentinel: Any = None

    async def aclose(self) -> None:
        await self.delivery.aclose()
        await self.commands.aclose()
        if self.sentinel is not None:
            for node in self.sentinel.sentinels:
                await node.aclose()


def _options() -> dict[str, Any]:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    # Our own loops retry (with backoff and de-duplication); redis-py's default of
    # ten jittered retries would hide an outage for many seconds.
    return dict(decode_responses=True, socket_timeout=5, socket_connect_timeout=2,
                retry=Retry(NoBackoff(), 0), health_check_interval=0)


def connect(target: RedisTarget, *, max_connections: int = 64) -> RedisClients:
    """The clients of ``target`` (no I/O yet: they connect on first use)."""
    if target.kind == SENTINEL:
        return _sentinel(target, max_connections)
    if target.kind == CLUSTER:
        return _cluster(target, max_connections)
    from redis.asyncio import BlockingConnectionPool, Redis

    kwargs = dict(_options(), username=target.username, password=target.password)
    # A blocking pool: a burst of more commands than connections waits for a free one
    # instead of failing as if Redis were down.
    pool = BlockingConnectionPool.from_url(target.url, max_connections=max_connections,
                                           timeout=5, **kwargs)
    return RedisClients(Redis(connection_pool=pool),
                        Redis.from_url(target.url, max_connections=2, **kwargs))


def _sentinel(target: RedisTarget, max_connections: int) -> RedisClients:
    from redis.asyncio import BlockingConnectionPool
    from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

    class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
        """The primary's pool, waiting for a free connection like the plain form's."""

    options = _options()
    # The sentinels answer fast or not at all: a dead one must not stall the lookup.
    sentinel_kwargs = dict(socket_timeout=1, socket_connect_timeout=1, retry=options["retry"])
    sentinel = Sentinel(list(target.hosts), sentinel_kwargs=sentinel_kwargs, **options,
                        ssl=target.tls)
    auth = dict(db=target.db, username=target.username, password=target.password)
    commands = sentinel.master_for(target.service, connection_pool_class=BlockingSentinelPool,
                                   max_connections=max_connections, timeout=5, **auth)
    delivery = sentinel.slave_for(target.service, max_connections=2, **auth)
    return RedisClients(commands, delivery, sentinel=sentinel)


def _cluster(target: RedisTarget, max_connections: int) -> RedisClients:
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    def client(connections: int) -> Any:
        nodes = [ClusterNode(host, port) for host, port in target.hosts]
        # A failover or a resharding answers CLUSTERDOWN/MOVED for a moment: redis-py
        # refreshes its slot map and retries a few times, our loops do the rest.
        return RedisCluster(startup_nodes=nodes, max_connections=connections,
                            username=target.username, password=target.password,
                            ssl=target.tls, **_options())

    # The live reader holds one blocking connection per watched hash slot and node.
    return RedisClients(client(max_connections), client(4 * max_connections), cluster=True)
