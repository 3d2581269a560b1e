"""deploy/nginx.conf for real: nginx in front of two app processes sharing one Redis, over
TLS with a throwaway self-signed certificate (made here with ``openssl``)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port
from tests.serve._helpers_server import (
    ChatStream,
    ServerDied,
    ServerProcess,
    bot_reply_to,
    login,
    running,
    send,
)

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]

NGINX = "/usr/sbin/nginx"
DEPLOY_CONF = ROOT / "deploy" / "nginx.conf"
SITE = "localhost"  # stands for the config's chat.example.com (resolves here, has SNI)
# What deploy/README.md says the apps behind this nginx must be given.
BEHIND_NGINX = {"XIAOX_TRUSTED_PROXIES": "127.0.0.1"}


def nginx_config(workdir: Path, ports: tuple[int, int], upstreams: list[int]) -> str:
    """deploy/nginx.conf with this test's ports, paths and certificate (unprivileged)."""
    text = DEPLOY_CONF.read_text()
    http, tls = ports
    replacements = {
        "worker_processes auto;": "worker_processes 1;",
        "error_log /var/log/nginx/xiaox-error.log warn;": f"error_log {workdir}/error.log warn;",
        "access_log /var/log/nginx/xiaox-access.log;": f"access_log {workdir}/access.log;",
        "listen 80 default_server;": f"listen 127.0.0.1:{http} default_server;",
        "listen 443 ssl default_server;": f"listen 127.0.0.1:{tls} ssl default_server;",
        "listen 80;": f"listen 127.0.0.1:{http};",
        "listen 443 ssl;": f"listen 127.0.0.1:{tls} ssl;",
        "server_name chat.example.com;": f"server_name {SITE};",
        "/etc/letsencrypt/live/chat.example.com/fullchain.pem": str(workdir / "cert.pem"),
        "/etc/letsencrypt/live/chat.example.com/privkey.pem": str(workdir / "key.pem"),
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


def make_certificate(workdir: Path) -> ssl.SSLContext:
    """A self-signed certificate for SITE, and a client context that trusts only it."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed for a throwaway certificate)")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(workdir / "key.pem"), "-out", str(workdir / "cert.pem"),
                    "-subj", f"/CN={SITE}", "-addext", f"subjectAltName=DNS:{SITE}"],
                   check=True, capture_output=True)
    return ssl.create_default_context(cafile=str(workdir / "cert.pem"))


class Stack:
    def __init__(self, http: int, tls: int, trust: ssl.SSLContext, apps: list[ServerProcess]):
        self.http_url, self.url = f"http://{SITE}:{http}", f"https://{SITE}:{tls}"
        self.tls_port, self.trust, self.apps = tls, trust, apps

    def client(self, **kwargs) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, verify=self.trust, timeout=30, **kwargs)


def wait_served(stack: Stack, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerDied(f"nginx exited ({proc.returncode}):\n{log.read_text()}")
        try:
            if httpx.get(stack.url + "/healthz", verify=stack.trust, timeout=1
                         ).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"nginx is not serving:\n{log.read_text()}")


@pytest.fixture
def stack(model_dir, redis_server, tmp_path):
    if not Path(NGINX).is_file() and shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (Debian package nginx)")
    trust = make_certificate(tmp_path)
    apps = [ServerProcess(model_dir, tmp_path, redis_url=redis_server.url, env=BEHIND_NGINX)
            for _ in range(2)]
    with running(*apps):
        ports = (free_port(), free_port())
        conf = tmp_path / "nginx.conf"
        conf.write_text(nginx_config(tmp_path, ports, [a.port for a in apps]))
        exe = NGINX if Path(NGINX).is_file() else shutil.which("nginx")
        proc = subprocess.Popen(
            [exe, "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(conf),
             "-g", f"daemon off; pid {tmp_path / 'nginx.pid'};"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        served = Stack(*ports, trust, apps)
        try:
            wait_served(served, proc, tmp_path / "error.log")
            yield served
        finally:
            proc.terminate()
            proc.wait(10)


async def test_events_stream_through_nginx_unbuffered_from_both_processes(stack):
    a, b = stack.apps
    async with stack.client() as viewer, \
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


async def test_nginx_closes_unknown_hosts_metrics_and_plain_http_and_sends_hsts(stack):
    a, _ = stack.apps
    # An unknown Host (a rebinding name) is closed without an answer, over HTTP and TLS.
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(stack.http_url + "/healthz", headers={"Host": "evil.example"}, timeout=5)
    with pytest.raises(httpx.ConnectError):  # no SNI of ours: the handshake is refused
        httpx.get(f"https://127.0.0.1:{stack.tls_port}/healthz", verify=False, timeout=5)
    plain = httpx.get(stack.http_url + "/login", timeout=5)
    assert plain.status_code == 301 and plain.headers["location"].startswith("https://")
    async with stack.client() as c:
        live = await c.get("/livez")
        assert live.status_code == 200
        assert "max-age=" in live.headers["strict-transport-security"]
        assert (await c.get("/metrics")).status_code == 404
        # The trusted proxy reports https: the cookie is Secure (XIAOX_COOKIE_SECURE unset).
        logged = await c.post("/login", json={"username": "tls user"})
        assert logged.status_code == 200
        assert "secure" in logged.headers["set-cookie"].lower()
        assert (await c.get("/me")).json() == {"user": "tls user"}
    async with a.client() as direct:  # the app's own port: /metrics for the machine only
        assert (await direct.get("/metrics")).status_code == 200


def test_the_deploy_config_passes_nginx_t(tmp_path):
    """``nginx -t`` on the config as shipped (certificate paths swapped for a throwaway)."""
    if not Path(NGINX).is_file() and shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (Debian package nginx)")
    make_certificate(tmp_path)
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_config(tmp_path, (free_port(), free_port()), [8001, 8002]))
    exe = NGINX if Path(NGINX).is_file() else shutil.which("nginx")
    result = subprocess.run([exe, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"),
                             "-c", str(conf), "-g", f"pid {tmp_path / 'nginx.pid'};"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = DEPLOY_CONF.read_text()
    assert "return 444;" in text and "Strict-Transport-Security" in text
    assert "location = /metrics" in text and "server_name _;" in text
