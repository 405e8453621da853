"""HTTP face: health, readiness, metrics, `POST /v1/speak`, `/v1/info` and the web client,
served by hypercorn's trio worker inside the daemon's own process (same host as the
WebSocket, port `http_port`).

`POST /v1/speak` goes through the same router as a WebSocket command: each request sends
its Envelope with a channel of its own, on which the router puts its one answer
(`accepted` or `error`); the broadcaster never hears of HTTP requests.

(Over 300 lines on purpose: every route, and the order of /v1/speak's checks with the
security headers and CORS that belong to it, are read together.)
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, Final, Protocol

import structlog
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.broadcaster import StatusView
from actors.http_stream import speak_streamed_body
from pipeline import __version__, access, client_input, protocol
from pipeline.commands import Command, TTSProvider
from pipeline.config import Settings
from pipeline.errors import SpeechError
from pipeline.events import Accepted, ErrorCode, ErrorEvent, ServerEvent
from pipeline.flow import Envelope
from pipeline.metrics import CONTENT_TYPE, Metrics
from pipeline.providers.registry import ProviderSet
from pipeline.session import SessionState

log = structlog.get_logger()

# The web client (web/ at the repository's top level) is package data of `pipeline`:
# pipeline/web in the wheel; in a checkout, pipeline/web is a symlink to web/. pip installs
# packages unpacked, so this is a real directory, which StaticFiles needs.
WEB_ROOT: Final = Path(str(resources.files("pipeline") / "web"))
# The HTTP status of each error code a /v1/speak request can get.
STATUS_BY_CODE: Final = {
    "unauthorized": 401,
    "queue_full": 429,
    "rate_limited": 429,
    "not_initialized": 503,
    "provider_unavailable": 503,
}
# The router takes a command in microseconds; not being able to hand one over for this
# long means the daemon is overloaded, which the client hears as 429 queue_full.
HANDOVER_TIMEOUT: Final = 5.0
# The router answers every command, at worst after checking a provider (connect_timeout).
REPLY_TIMEOUT: Final = 30.0
# Rate-limit buckets are kept per client address; past this many addresses they are all
# forgotten (a full bucket is the same as a new one, so only mid-burst clients gain).
MAX_TRACKED_CLIENTS: Final = 4096
# Hypercorn logs through this logger; only warnings and errors (its start-up banner
# would be a non-JSON line; the daemon logs `daemon.started` with the port instead).
HYPERCORN_LOG: Final = logging.getLogger("speechcast.http")
HYPERCORN_LOG.setLevel(logging.WARNING)
# Sent with every answer (the page and its files above all): the page loads only its own
# files, may open the daemon's WebSocket (another port, hence ws: and wss:), may not be
# framed, and the browser must not guess content types or leak the URL (its ?token=).
SECURITY_HEADERS: Final = (
    (
        b"content-security-policy",
        b"default-src 'self'; connect-src 'self' ws: wss:; frame-ancestors 'none'; "
        b"base-uri 'none'; form-action 'none'; object-src 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)
ALL_METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# What a cross-origin page listed in allowed_origins may send to /v1/speak.
CORS_PREFLIGHT: Final = {
    "Access-Control-Allow-Methods": "POST",
    "Access-Control-Allow-Headers": "Content-Type, Authorization",
    "Access-Control-Max-Age": "600",
    "Vary": "Origin",
}


class Cluster(Protocol):
    """What the HTTP face asks of a daemon sharing a broker (pipeline/broker/scale_out.py)."""

    def role(self) -> str: ...

    def problem(self) -> str | None: ...


class HttpFace:
    """The HTTP actor.

    Resource handling: owns its clone of the commands channel (closed when it stops) and
    hypercorn's listener. It reads the session through `status` (what the router last
    published) and asks `providers` only read-only questions.
    Once the daemon's drain calls `stop_accepting`, /readyz and /v1/speak answer 503;
    `stop` then ends hypercorn gracefully (its shutdown trigger).
    Error handling: every refused request gets the WebSocket's `error` event as its JSON
    body with the HTTP status of STATUS_BY_CODE (400 for bad input; 403 origin, 405
    method, 413 size, 415 content type).
    """

    def __init__(
        self,
        settings: Settings,
        commands: trio.MemorySendChannel[Envelope],
        *,
        status: Callable[[], StatusView],
        providers: ProviderSet,
        metrics: Metrics,
        ws_port: int,
        web_root: Path = WEB_ROOT,
        cluster: Cluster | None = None,
    ) -> None:
        self.settings = settings
        self.commands = commands
        self.status = status
        self.providers = providers
        self.metrics = metrics
        self.ws_port = ws_port
        self.cluster = cluster  # None: a daemon alone
        self.accepting = True
        self._stop_serving = trio.Event()  # hypercorn's shutdown trigger
        self._stopped = trio.Event()
        self.web_root = web_root
        self._buckets: dict[str, access.TokenBucket] = {}

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; `task_status` gets the bound port."""
        config = Config()
        host = f"[{self.settings.host}]" if ":" in self.settings.host else self.settings.host
        config.bind = [f"{host}:{self.settings.http_port}"]
        config.errorlog = HYPERCORN_LOG
        config.accesslog = None
        config.graceful_timeout = self.settings.close_timeout
        try:
            async with self.commands, trio.open_nursery() as nursery:
                # Starlette is an ASGI app; hypercorn's stricter ASGI typing does not see that.
                app = self.app()
                hypercorn = functools.partial(serve, app, config, shutdown_trigger=self._stop_serving.wait)  # type: ignore[arg-type]
                binds = await nursery.start(hypercorn)
                task_status.started(int(binds[0].rsplit(":", 1)[1]))
        finally:
            self._stopped.set()

    def stop_accepting(self) -> None:
        """A step of the daemon's drain: /readyz and /v1/speak answer 503 from now on."""
        self.accepting = False

    async def stop(self) -> None:
        """The last step of the daemon's drain: hypercorn stops listening, lets requests
        in flight finish (within close_timeout) and returns."""
        self._stop_serving.set()
        await self._stopped.wait()

    def app(self) -> Starlette:
        routes: list[Route | Mount] = [
            Route("/healthz", self.healthz),
            Route("/readyz", self.readyz),
            Route("/metrics", self.metrics_text),
            Route("/v1/info", self.info),
            # Every method: the route answers 405 itself, else the page's mount below
            # would take a GET and answer 404.
            Route("/v1/speak", self.speak, methods=ALL_METHODS),
        ]
        if self.web_root.is_dir():
            routes.append(Mount("/", StaticFiles(directory=self.web_root, html=True)))
        return Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)])

    # ------------------------------------------------------------ routes

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """200 while the session is open and the current provider, or one of its
        fallbacks, can speak (configured, its last check passed, its circuit closed);
        otherwise 503 with the reason (the current provider's own, when none can)."""
        view = self.status()
        current = view.provider
        chain = [current, *(TTSProvider(p) for p in self.settings.fallback if p != current.value)]
        reasons = [self.providers.not_ready_reason(name) for name in chain]
        reason = None if None in reasons else reasons[0]
        if not self.accepting:
            reason = "the daemon is shutting down"
        elif self.cluster is not None and (problem := self.cluster.problem()) is not None:
            reason = problem
        elif reason is None and view.session is not SessionState.OPEN:
            reason = f"the session is {view.session}; send initialize"
        if reason is not None:
            return JSONResponse({"status": "not_ready", "provider": current, "reason": reason}, 503)
        return JSONResponse({"status": "ready", "provider": current})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def info(self, request: Request) -> Response:
        view = self.status()
        return JSONResponse(
            {
                "version": __version__,
                "ws_port": self.ws_port,
                "provider": view.provider,
                "providers": list(protocol.PROVIDER_NAMES),
                "session": view.session,
                # With a broker: does this daemon speak, or only serve its listeners?
                **({"role": self.cluster.role()} if self.cluster is not None else {}),
            }
        )

    async def speak(self, request: Request) -> Response:
        """`{"text", "voice"?, "provider"?, "speed"?}` → 202 `{"utterance_id", "position"}`.

        Checks, in order: Origin (403), method (405, `Allow: POST`; OPTIONS is a CORS
        preflight), token (401), shutdown (503), rate (429), `Content-Type:
        application/json` (415), size (413), the body (400).
        """
        try:
            allow_origin = access.check_command_origin(self.settings, request.headers.raw, _own_origin(request))
        except access.HandshakeError as e:
            return _refuse(e.status, "unauthorized", e.message)
        cors = {"Access-Control-Allow-Origin": allow_origin, "Vary": "Origin"} if allow_origin else {}
        if request.method == "OPTIONS":
            return Response(status_code=204, headers={**cors, **CORS_PREFLIGHT} if allow_origin else {"Allow": "POST"})
        if request.method != "POST":
            return _refuse(405, "invalid_command", "send the text with POST", headers={"Allow": "POST"})
        response = await self._speak(request)
        response.headers.update(cors)
        return response

    async def _speak(self, request: Request) -> Response:
        try:
            token = access.presented_token(request.query_params.get("token"), request.headers.raw)
            if not access.grant_for(self.settings, token).control:
                return _refuse(401, "unauthorized", "this token may not send commands; use the control token")
        except access.HandshakeError as e:
            return _refuse(e.status, "unauthorized", e.message)
        if not self.accepting:
            return _refuse(503, "not_initialized", "the daemon is shutting down; try again later")
        if (wait := self._rate_limit_wait(request)) is not None:
            return _rate_limited(self.settings, wait)
        if _media_type(request.headers.get("content-type")) == "text/plain":
            # A streamed text. (A page on another origin could send text/plain without
            # asking the browser first, but the Origin check above has refused it.)
            return await speak_streamed_body(request, self.commands, STATUS_BY_CODE)
        if _media_type(request.headers.get("content-type")) != "application/json":
            # Only JSON (or the streamed text/plain above).
            return _refuse(
                415, "invalid_command", "send the body as Content-Type: application/json (or text/plain to stream it)"
            )
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.settings.max_message_size:
                return _refuse(413, "text_too_long", f"the body is over {self.settings.max_message_size} bytes")
        received_at = trio.current_time()
        try:
            command = client_input.parse_speak_body(bytes(body))
        except SpeechError as e:
            return _refuse(400, e.code, e.message)
        reply = await self._submit(command, received_at)
        if isinstance(reply, Accepted):
            return JSONResponse(protocol.accepted_body(reply), 202)
        status = STATUS_BY_CODE.get(reply.code, 400) if isinstance(reply, ErrorEvent) else 500
        headers = {"Retry-After": "1"} if status == 429 else None
        return JSONResponse(protocol.as_dict(reply), status, headers=headers)

    def _rate_limit_wait(self, request: Request) -> float | None:
        """None when this client address may send a command now (the WebSocket's
        rate_limit / rate_burst per connection, here per address), else seconds to wait."""
        address = request.client.host if request.client is not None else ""
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED_CLIENTS:
                self._buckets.clear()
            bucket = self._buckets[address] = access.TokenBucket(self.settings.rate_limit, self.settings.rate_burst)
        return None if bucket.take() else bucket.wait_seconds()

    async def _submit(self, command: Command, received_at: float) -> ServerEvent:
        """Hand one command to the router with a channel for its answer; that answer.

        Error handling: a router that cannot take the command within HANDOVER_TIMEOUT
        (overloaded) answers `queue_full`; one that does not answer within
        REPLY_TIMEOUT answers `provider_unavailable`.
        """
        answer_send, answer = trio.open_memory_channel[ServerEvent](1)
        with trio.move_on_after(HANDOVER_TIMEOUT) as handover:
            await self.commands.send(Envelope(None, command, received_at, answer=answer_send))
        if handover.cancelled_caught:
            return ErrorEvent(ErrorCode.QUEUE_FULL, "the daemon is too busy to take commands; try again later")
        with trio.move_on_after(REPLY_TIMEOUT):
            return await answer.receive()
        return ErrorEvent(ErrorCode.PROVIDER_UNAVAILABLE, f"the daemon did not answer within {REPLY_TIMEOUT:g} s")


class SecurityHeaders:
    """ASGI middleware adding SECURITY_HEADERS to every response (the page's above all)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)


def _own_origin(request: Request) -> str:
    """The origin a page served by this daemon has: scheme and Host of the request."""
    return f"{request.url.scheme}://{request.headers.get('host', '')}"


def _media_type(content_type: str | None) -> str:
    """The media type of a Content-Type header, without parameters (`; charset=utf-8`)."""
    return (content_type or "").partition(";")[0].strip().lower()


def _rate_limited(settings: Settings, wait: float) -> Response:
    log.info("command.rejected", code="rate_limited", via="http")
    payload = protocol.as_dict(access.rate_limited_error(settings, wait))
    return JSONResponse(payload, 429, headers={"Retry-After": str(max(1, math.ceil(wait)))})


def _error(code: ErrorCode, message: str) -> dict[str, Any]:
    return protocol.as_dict(ErrorEvent(code, message))


def _refuse(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    log.info("command.rejected", code=code, via="http", status=status)
    return JSONResponse(_error(ErrorCode(code), message), status, headers=headers)
