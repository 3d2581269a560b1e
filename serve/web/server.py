"""``python -m serve``: check the options and the model, then run uvicorn.

SIGTERM drains: uvicorn stops accepting, ends the SSE streams (sse-starlette watches for
the shutdown), waits for open requests up to ``drain_seconds``, then the app's lifespan
lets replies in flight finish before it stops the engine and the broker.

With ``--workers N`` the workers' metrics live in a fresh temporary directory
(``PROMETHEUS_MULTIPROC_DIR``, see ``serve.web.metrics``), made before they start and
removed when the server exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence

from serve.web.settings import Settings, parse_settings

# serve.web.metrics.MULTIPROC_ENV (not imported: prometheus_client reads it on import)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _check_model(settings: Settings) -> str | None:
    from serve.runtime.manifest import ModelError, load_manifest

    try:
        load_manifest(settings.model_path, verify=True)  # a clear error, not a traceback
    except ModelError as e:
        return str(e)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = parse_settings(argv)
    except ValueError as e:
        print(f"python -m serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    exposure = _exposure_problems(settings)
    if exposure:
        print("python -m serve: refusing to start:\n" + "\n".join(f"- {p}" for p in exposure),
              file=sys.stderr)
        return 2
    problem = _check_model(settings)
    if problem:
        print(f"python -m serve: {problem}\n(use --model DIR or XIAOX_MODEL to choose another "
              "model folder)", file=sys.stderr)
        return 2
    if not settings.secret_key and not settings.secret_keys:
        from serve.web.security.secret_key import load_or_create_secret_key

        try:  # created here, once, before any worker starts
            load_or_create_secret_key(settings.secret_key_file)
        except (OSError, ValueError) as e:
            print(f"python -m serve: cannot use the secret key file: {e}", file=sys.stderr)
            return 2

    import uvicorn

    common = dict(host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                  timeout_graceful_shutdown=max(1, int(settings.drain_seconds)),
                  server_header=False, **_proxy_options(settings))
    with _metrics_dir(settings.workers):
        if settings.workers > 1:
            # Workers are separate processes: they import the factory and read the settings
            # from the environment we fill here.
            os.environ.update(settings.to_env())
            uvicorn.run("serve.web.app:create_app_from_env", factory=True,
                        workers=settings.workers, **common)
        else:
            from serve.web.app import create_app

            uvicorn.run(create_app(settings), **common)
    return 0


def _exposure_problems(settings: Settings) -> list[str]:
    """Bound off loopback: the host names and an API key (or XIAOX_PUBLIC_API) are needed."""
    from serve.web.security.hosts import startup_problems

    return startup_problems(bind=settings.host, allowed_hosts=settings.allowed_hosts,
                            api_key=settings.api_key, public_api=settings.public_api)


def _proxy_options(settings: Settings) -> dict[str, object]:
    """Forwarded headers believed only from ``trusted_proxies`` (none by default: then a
    direct client could otherwise pick its address, and so its rate-limit budget)."""
    if not settings.trusted_proxies:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": list(settings.trusted_proxies)}


@contextlib.contextmanager
def _metrics_dir(workers: int) -> Iterator[None]:
    """Several workers: a fresh ``PROMETHEUS_MULTIPROC_DIR`` for their metrics (set before
    prometheus_client is imported, removed at exit). One process: none (a directory left
    in the environment by someone else would mix other processes' values into ours)."""
    if workers <= 1:
        os.environ.pop(MULTIPROC_ENV, None)
        yield
        return
    path = tempfile.mkdtemp(prefix="xiaox-metrics-")
    os.environ[MULTIPROC_ENV] = path
    try:
        yield
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(path, ignore_errors=True)
