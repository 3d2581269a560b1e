"""The server's guards, one module each; the middlewares are pure ASGI.

(``BaseHTTPMiddleware`` breaks the disconnect handling that SSE and streamed replies rely
on.)

| module | guard |
| --- | --- |
| ``secret_key`` | ``load_or_create_secret_key`` (whole or absent), ``signing_keys`` (rotation) |
| ``session`` | the signed session cookie: the logged-in user and the session id |
| ``revocation`` | ``Revocations``: logout on every process; ``RevocationMiddleware`` ends streams |
| ``hosts`` | ``HostCheckMiddleware`` (allowed ``Host`` names), what binding off loopback needs |
| ``client`` | ``client_ip``: the caller's address (behind a trusted proxy, the real one) |
| ``origin`` | ``OriginCheckMiddleware``: a browser POST must come from this site |
| ``cors`` | ``ApiCorsMiddleware``: CORS for ``/v1/*`` only, for the ``cors_origins`` |
| ``rate_limit`` | ``RateLimiter``: a token bucket per key; ``SharedRateLimiter``: through Redis |
| ``body_limit`` | ``BodyLimitMiddleware``: 413 for a body over the cap |
| ``text`` | ``InvalidInput`` and the checks of user-supplied text |
| ``headers`` | ``SecurityHeadersMiddleware``: nosniff, the page CSP |
| ``asgi`` | what the middlewares share: unsafe methods, header lookup, a JSON error |
"""
