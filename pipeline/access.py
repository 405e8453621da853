"""Who may connect, listen and command, and how often: the access rules that intake
applies at the WebSocket handshake (HTTP 401 · 403 · 503) and to every client message
(`unauthorized`, `rate_limited`). docs/access.md states the same rules for operators.

Tokens are compared in constant time and never formatted into a message or a log line.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from pipeline.config import Settings
from pipeline.events import ErrorCode, ErrorEvent

Headers = Sequence[tuple[bytes, bytes]]


class HandshakeError(Exception):
    """A connection request that is refused with an HTTP status and a short reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Grant:
    """What an admitted connection may do: `listen` (audio and broadcast events) and
    `control` (send commands). A valid control token grants both."""

    listen: bool
    control: bool


def header(headers: Headers, name: bytes) -> str | None:
    """The value of one request header (names arrive lower-cased), or None."""
    for key, value in headers:
        if key == name:
            return value.decode("latin-1").strip()
    return None


def presented_token(query_token: str | None, headers: Headers) -> str | None:
    """The token a request carries: `?token=` or `Authorization: Bearer`.

    Error handling: both present with different values is refused with 400, since it
    is unclear which one the client meant; a non-Bearer Authorization is ignored.
    """
    bearer = None
    authorization = header(headers, b"authorization")
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            bearer = value.strip()
    if bearer is not None and query_token is not None and not same_secret(bearer, query_token):
        raise HandshakeError(400, "two different tokens (query and Authorization header); send one")
    return bearer if bearer is not None else query_token


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison, so response timing tells nothing about the token."""
    return hmac.compare_digest(given.encode(), expected.encode())


def _normal_origin(origin: str) -> str:
    # Origins compare without case and without a trailing slash.
    return origin.strip().rstrip("/").lower()


def listed_origin(settings: Settings, origin: str) -> bool:
    """Whether `origin` is one of `allowed_origins`."""
    return _normal_origin(origin) in {_normal_origin(o) for o in settings.allowed_origins}


def check_origin(settings: Settings, headers: Headers) -> None:
    """Refuse (403) a browser whose Origin is not in `allowed_origins` (the WebSocket
    handshake's rule).

    No Origin header means the client is not a browser, and an empty list allows every
    origin. Origins compare without case and without a trailing slash.
    """
    origin = header(headers, b"origin")
    if origin is None or not settings.allowed_origins:
        return
    if not listed_origin(settings, origin):
        raise HandshakeError(403, "this origin may not connect; add it to allowed_origins")


def check_command_origin(settings: Settings, headers: Headers, own_origin: str) -> str | None:
    """The Origin rule for HTTP commands (`POST /v1/speak`): stricter than the
    WebSocket's, since any web page can send a browser there without asking first.

    Allowed: a request without Origin (not a browser), one from the daemon's own origin
    (`own_origin`, e.g. `http://127.0.0.1:8766`), and one from an origin listed in
    `allowed_origins`. Every other browser request is refused, also when the list is
    empty. Returns the origin to name in `Access-Control-Allow-Origin` (a listed origin
    other than our own), else None: no CORS header is ever sent for anyone else.

    Error handling: HandshakeError(403) for a refused origin (its value is not echoed).
    """
    origin = header(headers, b"origin")
    if origin is None or _normal_origin(origin) == _normal_origin(own_origin):
        return None
    if settings.allowed_origins and listed_origin(settings, origin):
        return origin
    raise HandshakeError(403, "a page from this origin may not send commands; add it to allowed_origins")


def grant_for(settings: Settings, token: str | None) -> Grant:
    """Decide what a connection presenting `token` may do (DESIGN.md section 7).

    Error handling: raises HandshakeError(401) when a listen token is configured and no
    valid token was presented, and when a token was presented that matches neither
    configured token (a wrong token is a mistake worth reporting at once, not a silent
    downgrade). An empty setting counts as not configured.
    """
    control_token = settings.control_token or None
    listen_token = settings.listen_token or None
    if control_token is None and listen_token is None:
        return Grant(listen=True, control=True)
    if token and control_token is not None and same_secret(token, control_token):
        return Grant(listen=True, control=True)
    if token and listen_token is not None and same_secret(token, listen_token):
        return Grant(listen=True, control=control_token is None)
    if token:
        raise HandshakeError(401, "the token is not valid")
    if listen_token is not None:
        raise HandshakeError(401, "a token is required: ?token=... or Authorization: Bearer ...")
    return Grant(listen=True, control=False)


def admit(settings: Settings, query_token: str | None, headers: Headers) -> Grant:
    """All handshake checks in their order: origin (403), then token (400/401)."""
    check_origin(settings, headers)
    return grant_for(settings, presented_token(query_token, headers))


class TokenBucket:
    """A per-connection command rate limit: `rate` tokens per second refill a bucket of
    `burst`; each command takes one. Time comes from `clock` (trio's by default, so
    tests can use MockClock)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = trio.current_time) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.tokens = float(burst)
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, cost: float = 1.0) -> bool:
        """Take `cost` tokens; False (and nothing taken) when the bucket has fewer."""
        self._refill()
        # The tolerance absorbs float rounding: waiting exactly `wait_seconds()` must pass.
        if self.tokens >= cost - 1e-9:
            self.tokens = max(0.0, self.tokens - cost)
            return True
        return False

    def wait_seconds(self) -> float:
        """How long until the next command would pass, rounded up to milliseconds."""
        self._refill()
        return math.ceil(max(0.0, (1.0 - self.tokens) / self.rate) * 1000) / 1000


def rate_limited_error(settings: Settings, wait: float) -> ErrorEvent:
    """The `rate_limited` error event for a command refused by a TokenBucket; `retry_after`
    (seconds) is an extension field, so a client need not parse the text."""
    message = (
        f"more than {settings.rate_limit:g} commands per second (bursts of {settings.rate_burst}); "
        f"try again in {wait:g} s"
    )
    return ErrorEvent(ErrorCode.RATE_LIMITED, message, retry_after=wait)


class ConnectionSlots:
    """Counts open connections against `max_connections`; one slot per connection."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    def take(self) -> bool:
        """Take a slot; False when all are in use (the caller refuses with 503)."""
        if self.in_use >= self.limit:
            return False
        self.in_use += 1
        return True

    def give_back(self) -> None:
        self.in_use -= 1
