"""Redis topologies for the scale-out tests, as real processes on free ports.

``SentinelTrio``: a primary, a replica and three ``redis-sentinel``s watching them, with
short timeouts (a dead primary is replaced in about two seconds). ``Cluster``: three
``redis-server --cluster-enabled`` nodes joined by ``redis-cli --cluster create``.
Each server is the suite's ``RedisServer`` (tests/conftest.py) with extra arguments.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tests.conftest import RedisServer, free_port, wait_for_port

SERVICE = "xiaox"
HOST = "127.0.0.1"


def needs(*programs: str) -> None:
    for program in programs:
        if shutil.which(program) is None:
            pytest.fail(f"{program} is not installed: run the README's test command "
                        "(./xiaox test installs redis-server, redis-tools, redis-sentinel)")


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except redis.RedisError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not after {timeout}s")


def unique_port(taken: set[int]) -> int:
    """A free port not handed out yet to this topology (free_port alone can repeat one)."""
    while (port := free_port()) in taken:
        pass
    taken.add(port)
    return port


def server(workdir: Path, taken: set[int], extra_args: tuple[str, ...] = ()) -> RedisServer:
    redis_server = RedisServer(workdir, extra_args)
    redis_server.port = unique_port(taken)
    return redis_server


def info(port: int, section: str) -> dict:
    with redis.Redis(host=HOST, port=port, socket_timeout=1) as r:
        return r.info(section)


class Sentinel:
    """One ``redis-sentinel`` process with its own (rewritable) configuration file."""

    def __init__(self, workdir: Path, primary_port: int, port: int):
        self.workdir = workdir
        self.port = port
        self.primary_port = primary_port
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "sentinel.conf"
        conf.write_text("\n".join([
            f"port {self.port}", f"bind {HOST}", f"dir {self.workdir}",
            f"sentinel monitor {SERVICE} {HOST} {self.primary_port} 2",
            f"sentinel down-after-milliseconds {SERVICE} 1000",
            f"sentinel failover-timeout {SERVICE} 4000",
            f"sentinel parallel-syncs {SERVICE} 1", ""]))
        self.proc = subprocess.Popen(["redis-sentinel", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_timeout=1, decode_responses=True)

    def primary(self) -> tuple[str, int] | None:
        with self.client() as r:
            address = r.execute_command("SENTINEL", "get-master-addr-by-name", SERVICE)
        return (address[0], int(address[1])) if address else None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


class SentinelTrio:
    """A primary, one replica, three sentinels (quorum 2): ``url`` is the app's URL."""

    def __init__(self, workdir: Path):
        needs("redis-server", "redis-sentinel")
        # The replica's first sync at once (Redis waits 5 s for more replicas by default).
        taken: set[int] = set()
        for folder in ("primary", "replica"):
            (workdir / folder).mkdir(parents=True)
        self.primary = server(workdir / "primary", taken, ("--repl-diskless-sync-delay", "0"))
        self.replica = server(workdir / "replica", taken,
                              ("--replicaof", HOST, str(self.primary.port)))
        self.sentinels = [Sentinel(workdir / f"sentinel{i}", self.primary.port,
                                   unique_port(taken)) for i in range(3)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self) -> SentinelTrio:
        self.primary.start()
        self.replica.start()
        wait(lambda: info(self.replica.port, "replication")["master_link_status"] == "up",
             20, "the replica's link to the primary")
        for sentinel in self.sentinels:
            sentinel.start()
        # Ready when every sentinel knows the replica and the two other sentinels.
        def ready() -> bool:
            for sentinel in self.sentinels:
                with sentinel.client() as r:
                    state = r.sentinel_master(SERVICE)
                if state["num-slaves"] < 1 or state["num-other-sentinels"] < 2:
                    return False
            return True
        wait(ready, 30, "the sentinels' view of the primary, the replica and each other")
        return self

    def primary_port(self) -> int | None:
        address = self.sentinels[0].primary()
        return address[1] if address else None

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        self.replica.stop()
        self.primary.stop()


class Cluster:
    """Three primaries, no replicas, every slot covered: ``url`` is the app's URL."""

    def __init__(self, workdir: Path, size: int = 3):
        needs("redis-server", "redis-cli")
        self.nodes = []
        taken: set[int] = set()
        for i in range(size):
            folder = workdir / f"node{i}"
            folder.mkdir(parents=True)
            self.nodes.append(server(folder, taken, (
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000", "--cluster-port", str(unique_port(taken)))))

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{n.port}" for n in self.nodes)

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        subprocess.run(["redis-cli", "--cluster", "create",
                        *(f"{HOST}:{n.port}" for n in self.nodes),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        wait(lambda: all(info(n.port, "cluster")["cluster_enabled"] == 1 and
                         _cluster_ok(n.port) for n in self.nodes),
             30, "cluster_state:ok on every node")
        return self

    def client(self) -> redis.cluster.RedisCluster:
        return redis.cluster.RedisCluster(host=HOST, port=self.nodes[0].port,
                                          decode_responses=True)

    def port_of_slot(self, slot: int) -> int:
        """The port of the node serving ``slot``."""
        with redis.Redis(host=HOST, port=self.nodes[0].port, decode_responses=True) as r:
            for start, end, primary, *_ in r.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(primary[1])
        raise LookupError(f"slot {slot} is not covered")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _cluster_ok(port: int) -> bool:
    with redis.Redis(host=HOST, port=port, decode_responses=True) as r:
        return "cluster_state:ok" in r.execute_command("CLUSTER", "INFO")
