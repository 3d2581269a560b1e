"""Chat messages acknowledged only once a replica holds them (Redis ``WAIT``).

Redis replicates asynchronously: a primary killed right after a write takes the write
with it, and Sentinel promotes a replica that never saw it. For ``message`` events the
publish script and ``WAIT n timeout`` go down one connection (a pipeline: ``WAIT``
counts the acknowledgements of *this connection's* writes), and a publish that no
replica acknowledged raises ``NotReplicated``, which the broker retries with the same
uid (the script then returns the id already written) and finally answers with a 503.

A primary left without any connected replica (its replica was promoted, the old primary
is not back yet) cannot be waited on: the write is accepted, and a warning logged once.
"""

from __future__ import annotations

import logging
from typing import Any

from serve.web.redis_clients import NotReplicated

log = logging.getLogger("xiaox.broker")


class Replication:
    """``WAIT`` for ``replicas`` acknowledgements, up to ``timeout_ms`` each write."""

    def __init__(self, replicas: int, timeout_ms: int):
        self.replicas = replicas
        self.timeout_ms = max(1, timeout_ms)
        self.alone = False  # the primary has no replica to wait for (logged once)

    async def run_script(self, client: Any, script: Any, keys: list, args: list) -> Any:
        """The script's result, once ``replicas`` replicas acknowledged it (or there
        are none to ask); NotReplicated when some exist and none answered in time."""
        if self.replicas <= 0:
            return await script(keys=keys, args=args)
        if self.alone:
            return await self._run_alone(client, script, keys, args)
        async with client.pipeline(transaction=False) as pipe:
            await script(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", self.replicas, self.timeout_ms)
            result, acked = await pipe.execute()
        if int(acked) >= self.replicas:
            return result
        connected = await self._connected_replicas(client)
        if int(acked) >= min(self.replicas, connected):
            self._alone(True)
            return result
        raise NotReplicated(f"{acked} of {self.replicas} replicas acknowledged the write "
                            f"in {self.timeout_ms} ms ({connected} connected)")

    async def _run_alone(self, client: Any, script: Any, keys: list, args: list) -> Any:
        # Without replicas a WAIT would only add its timeout (Redis checks it ten times a
        # second at best) to every message: ask ROLE first, on the write's own connection
        # so that a replica back in between is waited on for this very write.
        single = client.client()
        try:
            result = await script(keys=keys, args=args, client=single)
            connected = await self._connected_replicas(single)
            if connected == 0:
                return result
            self._alone(False)
            acked = await single.execute_command("WAIT", self.replicas, self.timeout_ms)
        finally:
            await single.aclose(close_connection_pool=False)
        if int(acked) >= min(self.replicas, connected):
            return result
        raise NotReplicated(f"{acked} of {self.replicas} replicas acknowledged the write "
                            f"in {self.timeout_ms} ms ({connected} connected)")

    @staticmethod
    async def _connected_replicas(client: Any) -> int:
        role = await client.execute_command("ROLE")
        return len(role[2]) if role and role[0] == "master" else 0

    def _alone(self, alone: bool) -> None:
        if alone and not self.alone:
            log.warning("the Redis primary has no connected replica: chat messages are "
                        "acknowledged without a copy until one is back")
        elif self.alone and not alone:
            log.info("a replica acknowledges chat messages again")
        self.alone = alone
