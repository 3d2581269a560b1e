"""The chat server's settings: one typed dataclass, from flags and ``XIAOX_*`` variables.

A flag wins over its environment variable, which wins over the default. The server
writes the resolved settings back into the environment (``to_env``) so that uvicorn's
worker processes, which import the app from a factory string, see the same values.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from serve.runtime.paths import DEFAULT_MODEL as DEFAULT_MODEL_DIR


def default_secret_key_file() -> Path:
    """``$XDG_STATE_HOME/xiaox/secret_key``, or ``~/.local/state/xiaox/secret_key``."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "xiaox" / "secret_key"


@dataclass
class Settings:
    model_dir: Path = DEFAULT_MODEL_DIR
    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str | None = field(default=None, repr=False)  # None: in-process; may hold a password
    workers: int = 1
    secret_key: str | None = field(default=None, repr=False)  # None: read/create the file
    secret_key_file: Path = field(default_factory=default_secret_key_file)
    api_key: str | None = field(default=None, repr=False)  # bearer key for /v1/*
    cookie_secure: bool = False  # True behind HTTPS
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (uvicorn's
    # forwarded_allow_ips); empty: none, the socket peer is the client.
    trusted_proxies: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()  # extra origins allowed to POST (besides same-origin)
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call /v1/* (CORS); "*" = any
    max_batch_size: int = 32
    max_queue: int = 256
    threads: int = 0  # onnxruntime intra-op threads; 0 = one per core (lower it per worker)
    max_body_bytes: int = 64 * 1024
    max_message_chars: int = 500
    max_username_chars: int = 32
    rate_limit_messages: int = 20  # per user and rate_limit_window seconds
    rate_limit_window: float = 60.0
    history_limit: int = 50
    log_max_events: int = 10_000  # the room's event log (approximate MAXLEN)
    history_max_messages: int = 1_000
    # Rooms (issue 16): limits keyed by session id and client IP, never the chosen name.
    rate_limit_ip_messages: int = 120  # per client IP and rate_limit_window (both must allow)
    max_streams_per_session: int = 8  # open /stream connections (429 past it)
    max_streams_per_ip: int = 64
    presence_grace_seconds: float = 15.0  # a reconnect within it announces no leave/join
    room_idle_seconds: float = 7 * 24 * 3600.0  # a room's log expires after so long unused
    max_rooms: int = 10_000  # rooms the in-process broker keeps (least recently used go)
    ping_seconds: float = 15.0
    reply_max_tokens: int = 40
    drain_seconds: float = 20.0
    log_level: str = "info"
    # "module:callable" that builds the engine as serve.runtime.engine.Engine is built
    # (empty: that Engine); the TensorFlow baseline benchmark swaps in its own this way.
    engine: str = ""
    # The engine in a process of its own (serve.runtime.remote_engine): the web layer and
    # the decoder do not share one interpreter's GIL, so two cores work under load
    # (False: one process, the engine's threads beside the web layer's event loop).
    engine_process: bool = True
    # --- bounded work (issue 16). What one /v1 request may ask: each at most the runtime's
    # ceiling (serve.runtime.options.CAPS, which bounds `ask`, `evaluate` and the engine
    # too); a setting may lower a ceiling, never raise it.
    api_max_tokens: int = 256  # max_tokens / min_tokens (ceiling 1024)
    api_max_n: int = 4  # choices per request (ceiling 8)
    api_max_beam_size: int = 8  # beam_size and num_hypotheses (ceiling 16)
    api_max_no_repeat_ngram_size: int = 8  # (ceiling 16)
    api_max_suppress_words: int = 16  # words per request (ceiling 64)
    api_max_suppress_word_chars: int = 16  # characters per word (ceiling 32)
    api_max_prompt_chars: int = 2_000  # all messages' contents summed, or the prompt
    # Lanes: the chat room's replies and /v1 requests each have a share of the decoder
    # batch's rows (guaranteed; rows a lane leaves idle are lent to the other) and of the
    # queue (a cap of its own), so neither can starve the other.
    api_batch_share: float = 0.5  # of max_batch_size; the chat room has the rest
    api_queue_share: float = 0.5  # of max_queue; the chat room has the rest
    # Redis Sentinel/Cluster (issue 19): a chat message is acknowledged once this many
    # replicas hold it (WAIT); -1: one under redis+sentinel://, none otherwise.
    redis_wait_replicas: int = -1
    redis_wait_ms: int = 500  # how long one WAIT may take before the write is retried
    # How long /send keeps retrying Redis (a failover takes about 2 s) before a 503.
    send_wait_seconds: float = 5.0
    # --- the public edge (issue 16: login limit, hosts, metrics, keys, exposure) ---
    login_rate_limit: int = 30  # logins per client IP and login_rate_window seconds
    login_rate_window: float = 60.0
    # Host names served (Starlette's TrustedHostMiddleware); empty: the loopback names
    # when bound to loopback, and a startup error when bound elsewhere.
    allowed_hosts: tuple[str, ...] = ()
    metrics_allow: tuple[str, ...] = ("127.0.0.1", "::1")  # who may read /metrics (IPs, CIDRs)
    # Session signing keys, newest first: the first signs, every one verifies (rotation).
    secret_keys: tuple[str, ...] = field(default=(), repr=False)
    public_api: bool = False  # bound off loopback without XIAOX_API_KEY: allowed only if set

    @property
    def model_path(self) -> Path:
        return Path(self.model_dir)

    def to_env(self) -> dict[str, str]:
        """The settings as ``XIAOX_*`` variables (secrets included only when set)."""
        env: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, tuple):
                value = ",".join(value)
            elif isinstance(value, bool):
                value = "1" if value else "0"
            env[_env_name(f.name)] = str(value)
        return env


_ENV_ALIASES = {"model_dir": "XIAOX_MODEL"}


def _env_name(name: str) -> str:
    return _ENV_ALIASES.get(name, "XIAOX_" + name.upper())


def _convert(name: str, default: object, raw: str) -> object:
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{_env_name(name)}={raw!r}: expected 1/0, true/false")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, Path):
        return Path(raw).expanduser()
    if isinstance(default, tuple):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw


def settings_from_env(env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Settings from ``XIAOX_*`` variables, then ``overrides`` (flags) on top."""
    env = os.environ if env is None else env
    base = Settings()
    values: dict[str, object] = {}
    for f in fields(Settings):
        raw = env.get(_env_name(f.name))
        if raw is None or (raw == "" and f.name in ("redis_url", "secret_key", "api_key")):
            continue
        try:
            values[f.name] = _convert(f.name, getattr(base, f.name), raw)
        except ValueError as e:
            raise ValueError(f"{_env_name(f.name)}={raw!r}: {e}") from e
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    if not 0 <= settings.port <= 65535:
        raise ValueError(f"port {settings.port} is out of range")
    if settings.workers < 1:
        raise ValueError("workers must be at least 1")
    if settings.workers > 1 and not settings.redis_url:
        raise ValueError(
            "--workers > 1 needs --redis-url: separate processes share chat rooms through Redis"
        )
    for name in ("max_body_bytes", "max_message_chars", "rate_limit_messages", "max_queue",
                 "max_batch_size", "history_limit", "reply_max_tokens",
                 "rate_limit_ip_messages", "max_streams_per_session", "max_streams_per_ip",
                 "max_rooms"):
        if getattr(settings, name) < 1:
            raise ValueError(f"{name} must be at least 1")
    _validate_redis(settings)
    if settings.threads < 0:
        raise ValueError("threads must be at least 0")
    for name in ("presence_grace_seconds", "room_idle_seconds"):
        if getattr(settings, name) < 0:
            raise ValueError(f"{name} must be at least 0")
    _validate_bounds(settings)
    for origin in settings.cors_origins:
        normalize_origin(origin)
    validate_edge(settings)


MIN_SECRET_KEY_CHARS = 32


def validate_edge(settings: Settings) -> None:
    """The edge settings: the login limit, the signing keys' length, the host patterns."""
    if settings.login_rate_limit < 1 or settings.login_rate_window <= 0:
        raise ValueError("login_rate_limit and login_rate_window must be positive")
    for key in (settings.secret_key, *settings.secret_keys):
        if key is not None and len(key) < MIN_SECRET_KEY_CHARS:
            raise ValueError(f"a session secret key (XIAOX_SECRET_KEY/XIAOX_SECRET_KEYS) must be "
                             f"at least {MIN_SECRET_KEY_CHARS} characters")
    for host in settings.allowed_hosts:
        if "*" in host[1:] or (host.startswith("*") and host != "*"
                               and not host.startswith("*.")):
            raise ValueError(f"XIAOX_ALLOWED_HOSTS: {host!r}: a wildcard is only '*.example.com'")
    for network in settings.metrics_allow:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ValueError(f"XIAOX_METRICS_ALLOW: {network!r} is not an address or a "
                             "network (e.g. 10.0.0.0/8)") from None


def api_ceilings() -> dict[str, int]:
    """Each ``api_max_*`` setting's ceiling: the runtime's cap (one source of truth)."""
    from serve.runtime.options import CAPS

    return {"api_max_tokens": CAPS["max_length"], "api_max_n": CAPS["generated_candidates"],
            "api_max_beam_size": CAPS["beam_size"],
            "api_max_no_repeat_ngram_size": CAPS["no_repeat_ngram_size"],
            "api_max_suppress_words": CAPS["suppress_words"],
            "api_max_suppress_word_chars": CAPS["suppress_word_chars"],
            "api_max_prompt_chars": 1_000_000}


def _validate_bounds(settings: Settings) -> None:
    for name, ceiling in {**api_ceilings(), "reply_max_tokens": api_ceilings()[
            "api_max_tokens"]}.items():
        if not 1 <= getattr(settings, name) <= ceiling:
            raise ValueError(f"{name} must be in [1, {ceiling}], got {getattr(settings, name)}")
    for name in ("api_batch_share", "api_queue_share"):
        if not 0 < getattr(settings, name) < 1:
            raise ValueError(f"{name} must be in (0, 1), got {getattr(settings, name)}")


def _validate_redis(settings: Settings) -> None:
    """A bad --redis-url is a startup error that names the problem (never a traceback)."""
    if not 0 < settings.send_wait_seconds <= 60:
        raise ValueError("send_wait_seconds must be more than 0 and at most 60")
    if not settings.redis_url:
        return
    from serve.web.redis_url import CLUSTER, parse_redis_url

    target = parse_redis_url(settings.redis_url)
    if settings.redis_wait_replicas > 0 and target.kind == CLUSTER:
        raise ValueError("XIAOX_REDIS_WAIT_REPLICAS: not supported with redis+cluster:// "
                         "(WAIT counts one connection's writes; use -1 or 0)")
    if settings.redis_wait_ms < 1:
        raise ValueError("redis_wait_ms must be at least 1")


_ORIGIN = re.compile(r"[a-z][a-z0-9+.\-]*://([a-z0-9.\-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?")


def normalize_origin(origin: str) -> str:
    """``scheme://host[:port]`` in lower case (what a browser sends as ``Origin``), or "*"."""
    value = origin.strip().rstrip("/").lower()
    if value != "*" and not _ORIGIN.fullmatch(value):
        raise ValueError(f"XIAOX_CORS_ORIGINS: {origin!r} is not an origin "
                         "(scheme://host[:port], no path), nor *")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serve",
        description="The xiaoX chat server (every option also reads XIAOX_<OPTION>).",
    )
    p.add_argument("--model", dest="model_dir", type=Path,
                   help="model folder (XIAOX_MODEL; default: the shipped artifacts/xiaox)")
    p.add_argument("--host", help="bind address (XIAOX_HOST; default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (XIAOX_PORT; default 8000)")
    p.add_argument("--redis-url", help="Redis URL for rooms shared across processes "
                   "(XIAOX_REDIS_URL; default: in-process, one process)")
    p.add_argument("--workers", type=int, help="worker processes (XIAOX_WORKERS; needs Redis)")
    p.add_argument("--secret-key-file", type=Path,
                   help="where the session key is kept (XIAOX_SECRET_KEY_FILE)")
    p.add_argument("--max-batch-size", type=int, help="XIAOX_MAX_BATCH_SIZE")
    p.add_argument("--max-queue", type=int, help="XIAOX_MAX_QUEUE")
    p.add_argument("--threads", type=int,
                   help="onnxruntime threads per process (XIAOX_THREADS; 0 = one per core)")
    p.add_argument("--log-level", help="XIAOX_LOG_LEVEL (debug, info, warning)")
    return p


def parse_settings(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Settings:
    args = build_parser().parse_args(list(argv))
    return settings_from_env(env, **vars(args))
