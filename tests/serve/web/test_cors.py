"""CORS for ``/v1/*`` only: the configured origins' pages may call the API; other origins
get no CORS header (a preflight of theirs a 403), and the chat routes never send one."""

from __future__ import annotations

import httpx
import pytest

from serve.web.app import create_app
from serve.web.settings import Settings, settings_from_env
from tests.serve._helpers_server import ServerProcess

pytestmark = pytest.mark.timeout(120)

ALLOWED = "https://app.example"
OTHER = "https://evil.example"
KEY = "cors-test-key"


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    process = ServerProcess(model_dir, tmp_path_factory.mktemp("cors"), env={
        "XIAOX_CORS_ORIGINS": f"{ALLOWED}/, http://localhost:5173", "XIAOX_API_KEY": KEY,
    }).start()
    yield process
    process.stop()


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


def preflight(origin: str, method: str = "POST") -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization, content-type"}


def words(value: str) -> set[str]:
    return {part.strip().lower() for part in value.split(",")}


async def test_a_preflight_from_a_configured_origin_is_allowed(server):
    async with server.client() as c:
        for path, method in (("/v1/chat/completions", "POST"), ("/v1/models", "GET")):
            response = await c.options(path, headers=preflight(ALLOWED, method))
            assert response.status_code == 200, response.text
            assert response.headers["access-control-allow-origin"] == ALLOWED
            assert words(response.headers["access-control-allow-methods"]) == {
                "get", "post", "options"}
            assert {"authorization", "content-type"} <= words(
                response.headers["access-control-allow-headers"])
            assert "access-control-allow-credentials" not in response.headers
        other = await c.options("/v1/models", headers=preflight("http://localhost:5173", "GET"))
        assert other.headers["access-control-allow-origin"] == "http://localhost:5173"


async def test_a_preflight_from_another_origin_is_refused_without_cors_headers(server):
    async with server.client() as c:
        response = await c.options("/v1/chat/completions", headers=preflight(OTHER))
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "cors_origin"  # OpenAI's shape under /v1
        assert cors_headers(response) == {}


async def test_the_configured_origin_calls_the_api_cross_site(server):
    body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 2,
            "reply_mode": "generate", "temperature": 0}
    auth = {"Authorization": f"Bearer {KEY}", "Sec-Fetch-Site": "cross-site"}
    async with server.client() as c:
        # The Origin check (the cookie routes' CSRF guard) lets it through: bearer key.
        allowed = await c.post("/v1/chat/completions", json=body,
                               headers={**auth, "Origin": ALLOWED})
        assert allowed.status_code == 200, allowed.text
        assert allowed.headers["access-control-allow-origin"] == ALLOWED
        refused_key = await c.get("/v1/models", headers={"Origin": ALLOWED})
        assert refused_key.status_code == 401  # the API's errors are readable there too
        assert refused_key.headers["access-control-allow-origin"] == ALLOWED
        other = await c.get("/v1/models", headers={**auth, "Origin": OTHER})
        assert other.status_code == 200 and cors_headers(other) == {}


async def test_the_chat_routes_never_send_cors_headers(server):
    async with server.client() as c:
        for path in ("/login", "/me", "/history", "/healthz", "/livez", "/readyz", "/metrics",
                     "/static/chat.js"):
            response = await c.get(path, headers={"Origin": ALLOWED})
            assert cors_headers(response) == {}, path
        for path in ("/send", "/login", "/v1x"):
            response = await c.options(path, headers=preflight(ALLOWED))
            assert response.status_code != 200 and cors_headers(response) == {}, path
        # A CORS origin is not a trusted site for the cookie routes.
        login = await c.post("/login", json={"username": "跨站"},
                             headers={"Origin": ALLOWED})
        assert login.status_code == 403 and login.json()["reason"] == "bad_origin"
        assert cors_headers(login) == {}


async def test_no_cors_origins_no_cors_at_all():
    app = create_app(Settings(secret_key="k" * 40))  # the default: none
    transport = httpx.ASGITransport(app=app)  # no lifespan: the model is not loaded
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
        response = await c.options("/v1/chat/completions", headers=preflight(ALLOWED))
        assert response.status_code == 405 and cors_headers(response) == {}


def test_cors_origins_is_a_comma_separated_setting():
    settings = settings_from_env({"XIAOX_CORS_ORIGINS": "https://a.example, http://b:8080/"})
    assert settings.cors_origins == ("https://a.example", "http://b:8080/")
    assert settings_from_env(settings.to_env()) == settings
    assert settings_from_env({}).cors_origins == ()
    for bad in ("https://a.example/chat", "a.example", "null"):
        with pytest.raises(ValueError, match="XIAOX_CORS_ORIGINS"):
            settings_from_env({"XIAOX_CORS_ORIGINS": bad})
