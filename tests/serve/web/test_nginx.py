"""deploy/nginx.conf for real: nginx in front of two app processes sharing one Redis."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port
from tests.serve._helpers_server import (
    ChatStream,
    ServerProcess,
    bot_reply_to,
    login,
    running,
    send,
    wait_healthy,
)

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]

NGINX = "/usr/sbin/nginx"
DEPLOY_CONF = ROOT / "deploy" / "nginx.conf"


def nginx_config(workdir: Path, port: int, upstreams: list[int]) -> str:
    """deploy/nginx.conf with this test's ports and paths (nginx runs unprivileged)."""
    text = DEPLOY_CONF.read_text()
    replacements = {
        "worker_processes auto;": "worker_processes 1;",
        "error_log /var/log/nginx/xiaox-error.log warn;": f"error_log {workdir}/error.log warn;",
        "access_log /var/log/nginx/xiaox-access.log;": f"access_log {workdir}/access.log;",
        "listen 8080;": f"listen 127.0.0.1:{port};",
        "server 127.0.0.1:8001 ": f"server 127.0.0.1:{upstreams[0]} ",
        "server 127.0.0.1:8002 ": f"server 127.0.0.1:{upstreams[1]} ",
        "http {": "http {\n" + "".join(
            f"    {name}_temp_path {workdir}/{name}_temp;\n"
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
    }
    for old, new in replacements.items():
        assert old in text, f"deploy/nginx.conf no longer contains {old!r}"
        text = text.replace(old, new)
    if not Path("/etc/nginx/mime.types").is_file():
        text = text.replace("include /etc/nginx/mime.types;", "")
    return text


@pytest.fixture
def stack(model_dir, redis_server, tmp_path):
    if not Path(NGINX).is_file() and shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (Debian package nginx)")
    apps = [ServerProcess(model_dir, tmp_path, redis_url=redis_server.url) for _ in range(2)]
    with running(*apps):
        port = free_port()
        conf = tmp_path / "nginx.conf"
        conf.write_text(nginx_config(tmp_path, port, [a.port for a in apps]))
        exe = NGINX if Path(NGINX).is_file() else shutil.which("nginx")
        proc = subprocess.Popen(
            [exe, "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(conf),
             "-g", f"daemon off; pid {tmp_path / 'nginx.pid'};"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc, (tmp_path / "error.log").read_text, timeout=15)
            yield url, apps
        finally:
            proc.terminate()
            proc.wait(10)


async def test_events_stream_through_nginx_unbuffered_from_both_processes(stack):
    url, (a, b) = stack
    async with httpx.AsyncClient(base_url=url, timeout=30) as viewer, \
            a.client() as on_a, \
            b.client() as on_b:
        await login(viewer, "behind nginx")
        await login(on_a, "on a")
        await login(on_b, "on b")
        async with ChatStream(viewer) as stream:
            assert stream.status == 200
            # The first event (our own join) arrives at once although the response goes on:
            # nothing waits for a buffer to fill.
            await stream.wait_for(lambda ev: any(e["event"] == "join" for e in ev), timeout=5)
            from_a, from_b = await send(on_a, "经由A"), await send(on_b, "经由B")
            through = await send(viewer, "经由nginx")
            for sent in (from_a, from_b, through):
                started = time.monotonic()
                await stream.wait_for(bot_reply_to(sent["id"]), timeout=15)
            assert time.monotonic() - started < 15
        types = [e["event"] for e in stream.events]
        assert "typing" in types and "message" in types
    # nginx logs a request when it ends: the stream's line comes after the disconnect.
    deadline = time.monotonic() + 10
    while "GET /stream" not in (access := (a.workdir / "access.log").read_text()):
        assert time.monotonic() < deadline, access
        time.sleep(0.1)
    assert "POST /send" in access
