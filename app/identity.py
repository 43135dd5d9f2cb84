"""Per-browser identity: who is asking, for the UI handlers and for the media routes.

The first page load sets an HttpOnly cookie holding a random secret token. The user name the engine
sees is a hash of that token, so the database never holds the secret, and a media URL fetched from
another browser (another token) names another user: the engine answers "not found" and the route 404s.

Clearing the browser's cookies starts a new, empty identity. API clients (gradio_client) pick their
own secret and send it as a cookie: `Client(url, headers={"Cookie": "worldsim_uid=<32+ random chars>"})`.
Gradio's own auth is not used: it would need a user list, and its session cookie is Gradio's business,
which our media routes could not check.
"""

from __future__ import annotations

import hashlib
import http.cookies
import re
import secrets

COOKIE = "worldsim_uid"
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{32,128}$")
MAX_AGE_S = 5 * 365 * 24 * 3600


class NoIdentity(LookupError):
    """The request carries no valid identity cookie."""


def new_token() -> str:
    return secrets.token_urlsafe(32)


def user_for_token(token: str) -> str:
    """The engine's user name for a token: 'b-' + 32 hex digits of its SHA-256."""
    return "b-" + hashlib.sha256(token.encode()).hexdigest()[:32]


def token_from_cookie_header(header: str | None) -> str | None:
    if not header:
        return None
    jar = http.cookies.SimpleCookie()
    try:
        jar.load(header)
    except http.cookies.CookieError:
        return None
    morsel = jar.get(COOKIE)
    if morsel is None or not TOKEN_RE.match(morsel.value):
        return None
    return morsel.value


def user_of(request) -> str:
    """The user behind a gr.Request or a starlette Request, else NoIdentity."""
    headers = getattr(request, "headers", None) if request is not None else None
    token = token_from_cookie_header(headers.get("cookie") if headers is not None else None)
    if token is None:
        raise NoIdentity(f"no browser identity: allow cookies for this site (API clients: send the cookie "
                         f"{COOKIE}=<a random secret of 32 to 128 letters, digits, '-' or '_'>)")
    return user_for_token(token)


class IdentityCookie:
    """ASGI middleware: gives every browser without a valid identity cookie a new one.

    Pure ASGI (not BaseHTTPMiddleware) so Gradio's server-sent event streams pass through untouched.
    The request itself is not changed: a request without the cookie has no identity, and the next
    request from that browser carries the new one."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = b"; ".join(v for k, v in scope.get("headers", []) if k == b"cookie").decode("latin-1")
        if token_from_cookie_header(header) is not None:
            return await self.app(scope, receive, send)
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        cookie = f"{COOKIE}={new_token()}; Path=/; Max-Age={MAX_AGE_S}; HttpOnly; SameSite=Lax{secure}"

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            await send(message)

        return await self.app(scope, receive, send_with_cookie)
