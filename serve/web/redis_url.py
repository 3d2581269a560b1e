"""``--redis-url`` read strictly: one Redis, a Sentinel-watched primary, or a Cluster.

Three forms (``rediss``/``+tls`` variants use TLS)::

    redis://[user:password@]host:port/db
    redis+sentinel://[user:password@]h1:p1,h2:p2,h3:p3/SERVICE/db
    redis+cluster://[user:password@]h1:p1,h2:p2

A wrong URL is a ``ValueError`` that names the problem (the server prints it and exits
with status 2 at startup); no message ever repeats the password.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote

PLAIN, SENTINEL, CLUSTER = "redis", "sentinel", "cluster"
_SCHEMES = {"redis": (PLAIN, False), "rediss": (PLAIN, True),
            "redis+sentinel": (SENTINEL, False), "rediss+sentinel": (SENTINEL, True),
            "redis+cluster": (CLUSTER, False), "rediss+cluster": (CLUSTER, True)}
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.\-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")
_SERVICE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is: ``kind`` is ``redis``, ``sentinel`` or ``cluster``."""

    kind: str
    hosts: tuple[tuple[str, int], ...]
    service: str | None = None  # the Sentinel service (the primary's name)
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    @property
    def url(self) -> str:
        """A plain ``redis://`` URL of the first host (for the single-Redis form)."""
        scheme = "rediss" if self.tls else "redis"
        host, port = self.hosts[0]
        return f"{scheme}://{host}:{port}/{self.db}"

    def describe(self) -> str:
        """For logs: the topology, never the password."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        if self.kind == SENTINEL:
            return f"sentinel {hosts} service {self.service} db {self.db}"
        if self.kind == CLUSTER:
            return f"cluster {hosts}"
        return f"redis {hosts} db {self.db}"


def parse_redis_url(url: str) -> RedisTarget:
    """The URL's target; ValueError naming what is wrong with it."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise ValueError(f"redis URL {redact(url)!r}: the scheme must be one of "
                         + ", ".join(f"{s}://" for s in _SCHEMES))
    kind, tls = _SCHEMES[scheme.lower()]
    if "?" in rest or "#" in rest:
        raise ValueError(f"redis URL {redact(url)!r}: query strings and fragments are not "
                         "supported")
    credentials, at, location = rest.rpartition("@")
    username, password = _credentials(credentials) if at else (None, None)
    netloc, _, path = location.partition("/")
    hosts = _hosts(netloc, url, several=kind != PLAIN)
    parts = [p for p in path.split("/")] if path else []
    if parts and parts[-1] == "":
        parts.pop()  # a trailing slash
    service, db = _path(kind, parts, url)
    return RedisTarget(kind, hosts, service, db, username, password, tls)


def _credentials(text: str) -> tuple[str | None, str | None]:
    user, colon, password = text.partition(":")
    if not colon:  # redis://secret@host: redis-py reads a lone word as the password
        return None, unquote(user) or None
    return unquote(user) or None, unquote(password) or None


def _hosts(netloc: str, url: str, *, several: bool) -> tuple[tuple[str, int], ...]:
    if not netloc:
        raise ValueError(f"redis URL {redact(url)!r}: no host")
    items = netloc.split(",")
    if len(items) > 1 and not several:
        raise ValueError(f"redis URL {redact(url)!r}: several hosts need redis+sentinel:// "
                         "or redis+cluster://")
    hosts = []
    for item in items:
        host, colon, port = item.rpartition(":") if not item.endswith("]") else (item, "", "")
        if not colon:
            host, port = item, "6379" if not several else ""
        if not port:
            raise ValueError(f"redis URL {redact(url)!r}: {item!r} needs a port (host:port)")
        if not _HOST.fullmatch(host):
            raise ValueError(f"redis URL {redact(url)!r}: {host!r} is not a host name")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"redis URL {redact(url)!r}: port {port!r} is not 1-65535")
        hosts.append((host.strip("[]"), int(port)))
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"redis URL {redact(url)!r}: a host is listed twice")
    return tuple(hosts)


def _path(kind: str, parts: list[str], url: str) -> tuple[str | None, int]:
    if kind == CLUSTER:
        if parts and parts != ["0"]:
            raise ValueError(f"redis URL {redact(url)!r}: a cluster has only database 0 "
                             "(no /SERVICE or /db after the hosts)")
        return None, 0
    service = None
    if kind == SENTINEL:
        if not parts or not _SERVICE.fullmatch(parts[0]):
            raise ValueError(f"redis URL {redact(url)!r}: name the Sentinel service after "
                             "the hosts: redis+sentinel://h1:p1,h2:p2/SERVICE/db")
        service, parts = parts[0], parts[1:]
    if len(parts) > 1:
        raise ValueError(f"redis URL {redact(url)!r}: too many path parts")
    db = parts[0] if parts else "0"
    if not db.isdigit() or int(db) > 15_000:
        raise ValueError(f"redis URL {redact(url)!r}: the database {db!r} is not a number")
    return service, int(db)


def redact(url: str) -> str:
    """The URL without its password (what logs and error messages show)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
