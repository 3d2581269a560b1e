"""Who is calling: the client's address.

uvicorn's ``ProxyHeadersMiddleware`` (``--proxy-headers``, on when ``trusted_proxies`` is
set) rewrites the ASGI ``client`` from ``X-Forwarded-For`` only when the connection comes
from one of those proxies, so the address here is the real client's behind nginx and the
socket peer's otherwise: a direct caller cannot choose it with a header.
"""

from __future__ import annotations

from starlette.types import Scope


def client_ip(scope: Scope) -> str:
    """The caller's IP address ("unknown" when the server gives none, e.g. a test client)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"
