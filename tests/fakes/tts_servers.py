"""Real HTTP servers on loopback that behave like Kokoros, Kokoro-FastAPI and OpenAI.

Each fake is a small ASGI app served by hypercorn's trio worker on 127.0.0.1, port 0, so
tests exercise real sockets, real chunked bodies and real disconnects.

Starting one inside a trio test:

    fake = FakeKokoros(pcm=tone(200), splits=[1, 3, 4801])
    async with fake.running() as url:          # url = "http://127.0.0.1:PORT"
        ...                                    # the server stops when the block ends
    # or, in a nursery you own:  url = await nursery.start(fake.serve)

What every fake can be told (constructor keywords; also plain attributes, which a test
may change between requests):
    pcm          bytes sent as the audio of every successful speech request
                 (default `tone()`, 100 ms of 440 Hz, s16le 24 kHz)
    splits       byte offsets where the body is cut into separate HTTP chunks, e.g.
                 [1, 3] sends pcm[:1], pcm[1:3], pcm[3:]; odd offsets split a sample
    stall_after  after this many body bytes, stop sending (headers already out) until
                 the test sets `release` or the client goes away; sets `stalled` on arrival
    break_after  after this many body bytes, drop the connection without ending the body
                 (>= len(pcm): everything is sent, then the ending is missing)
    fail_first   the first K speech requests fail with `fail_status` (default 500) in
                 the server's own error format; `retry_after` adds a Retry-After header
    voices       voices the server knows (None: any)

What every fake reports:
    requests         every request as a `RecordedRequest` (method, path, headers with
                     lower-case names, body bytes, `.json`)
    speech_requests  the POST /v1/audio/speech ones
    disconnects      how many clients left in the middle of a body
    client_left      trio.Event, set when a client left in the middle of a body
    stalled          trio.Event, set when a body reached `stall_after`
    release          trio.Event a test sets to let stalled bodies go on
    in_flight, max_in_flight   speech bodies being sent now / at most at once

Behaviour of each fake (from the servers' source):
    FakeKokoros        `koko openai`: GET / -> "OK"; stream (the default) -> raw s16le
                       24 kHz chunked as audio/pcm whatever response_format says; unknown
                       voice in stream mode -> 200 with no bytes; "stream": false -> WAV
                       32-bit float with 0xFFFFFFFF sizes ("wav"), raw pcm ("pcm") or mp3
                       bytes (anything else); EVERY error -> HTTP 500 with an empty body.
    FakeKokoroFastAPI  GET /health; errors `{"detail": {"error","message","type"}}` (400,
                       500) or FastAPI's 422 list; "wav" -> a 16-bit WAV; default stream.
    FakeOpenAI         `FakeOpenAI(api_key="sk-...", **options)`: Bearer key check -> 401
                       `{"error": {...}}` (echoing the key masked, as OpenAI does);
                       GET /v1/models; `fail_status=429` answers a rate-limit error, with
                       Retry-After when `retry_after` is set.

Helpers: `tone(ms, hz, rate)` makes recognisable PCM; `wav_float32_streaming(samples)`
and `wav_s16(pcm, rate, channels)` make the WAV files the servers send.

Do not use `trio.testing.MockClock` with these: hypercorn's keep-alive timers would jump.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
SPEECH_PATH = "/v1/audio/speech"
SAMPLE_RATE = 24000


def tone(ms: int = 100, hz: float = 440.0, rate: int = SAMPLE_RATE) -> bytes:
    """`ms` milliseconds of a sine as PCM s16le mono (never all zeros, so it is recognisable)."""
    n = rate * ms // 1000
    return b"".join(struct.pack("<h", round(12000 * math.sin(2 * math.pi * hz * i / rate))) for i in range(n))


def wav_float32_streaming(samples: Sequence[float], rate: int = SAMPLE_RATE) -> bytes:
    """A WAV the way Kokoros writes it without `stream`: format 3, sizes 0xFFFFFFFF."""
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 0xFFFFFFFF, b"WAVE", b"fmt ", 16, 3, 1,
                         rate, rate * 4, 4, 32, b"data", 0xFFFFFFFF)
    return header + struct.pack(f"<{len(samples)}f", *samples)


def wav_s16(pcm: bytes, rate: int = SAMPLE_RATE, channels: int = 1) -> bytes:
    """A plain 16-bit PCM WAV with exact sizes, as Kokoro-FastAPI sends for "wav"."""
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(pcm), b"WAVE", b"fmt ", 16, 1, channels,
                       rate, rate * 2 * channels, 2 * channels, 16, b"data", len(pcm)) + pcm


@dataclass
class RecordedRequest:
    """One request as the fake saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        """The body parsed as JSON, or None if it is not JSON."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class _BreakOff(Exception):
    """Raised inside the app to make hypercorn drop the connection mid-body."""


@dataclass
class FakeTTSServer:
    """The machinery shared by the fakes; subclasses decide what each request gets."""

    pcm: bytes = field(default_factory=tone)
    splits: Sequence[int] = ()
    stall_after: int | None = None
    break_after: int | None = None
    fail_first: int = 0
    fail_status: int = 500
    retry_after: float | None = None
    voices: Collection[str] | None = None
    requests: list[RecordedRequest] = field(default_factory=list)
    disconnects: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    base_url: str | None = None

    def __post_init__(self) -> None:
        self.client_left = trio.Event()
        self.stalled = trio.Event()
        self.release = trio.Event()

    @property
    def speech_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "POST" and r.path == SPEECH_PATH]

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; `nursery.start(fake.serve)` returns the base URL."""
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.errorlog = None  # a break-off is an exception in the app, on purpose
        config.graceful_timeout = 0.1
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(serve, self._app, config)
            self.base_url = binds[0]
            task_status.started(self.base_url)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        """Serve for the duration of the block; yields the base URL."""
        async with trio.open_nursery() as nursery:
            url = await nursery.start(self.serve)
            try:
                yield url
            finally:
                nursery.cancel_scope.cancel()

    # -- the ASGI app -------------------------------------------------------------------

    async def _app(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"]
                if kind == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif kind == "lifespan.shutdown":
                    return await send({"type": "lifespan.shutdown.complete"})
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request = RecordedRequest(scope["method"], scope["path"], headers, bytes(body))
        self.requests.append(request)
        await self.handle(request, receive, send)

    async def handle(self, request: RecordedRequest, receive: Receive, send: Send) -> None:
        """Answer one request; each fake overrides this."""
        await self.send_bytes(send, 404, b"")

    def should_fail(self) -> bool:
        """True for the first `fail_first` speech requests."""
        return len(self.speech_requests) <= self.fail_first

    async def send_bytes(self, send: Send, status: int, body: bytes, content_type: str = "text/plain",
                         headers: Sequence[tuple[str, str]] = ()) -> None:
        """A whole answer with Content-Length."""
        raw = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        raw += [(k.encode(), v.encode()) for k, v in headers]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def send_json(self, send: Send, status: int, data: Any, headers: Sequence[tuple[str, str]] = ()) -> None:
        await self.send_bytes(send, status, json.dumps(data).encode(), "application/json", headers)

    def failure_headers(self) -> list[tuple[str, str]]:
        return [] if self.retry_after is None else [("retry-after", f"{self.retry_after:g}")]

    async def stream(self, receive: Receive, send: Send, body: bytes, content_type: str = "audio/pcm") -> None:
        """Send `body` chunked, cut at `splits`, stalling or breaking off where told.

        Error handling: raises `_BreakOff` at `break_after` (hypercorn then closes the
        connection without the final chunk); a client that leaves mid-body is counted.
        """
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type.encode())]})
        offsets = sorted({0, len(body), *(c for c in (*self.splits, self.stall_after, self.break_after)
                                          if c is not None and 0 < c < len(body))})
        finished = False
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            async with trio.open_nursery() as nursery:

                async def watch_for_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    if not finished:
                        self.disconnects += 1
                        self.client_left.set()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch_for_disconnect)
                for start, end in zip(offsets, [*offsets[1:], None], strict=True):
                    if self.stall_after is not None and start >= self.stall_after:
                        self.stalled.set()
                        await self.release.wait()
                    if self.break_after is not None and start >= self.break_after:
                        raise _BreakOff(f"breaking off after {start} bytes")
                    if end is not None:
                        await send({"type": "http.response.body", "body": body[start:end], "more_body": True})
                finished = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                nursery.cancel_scope.cancel()
        finally:
            self.in_flight -= 1


class FakeKokoros(FakeTTSServer):
    """Like `koko openai` (lucasjinreal/Kokoros): every error is a bare HTTP 500."""

    async def handle(self, request: RecordedRequest, receive: Receive, send: Send) -> None:
        if request.method == "GET" and request.path == "/":
            return await self.send_bytes(send, 200, b"OK", "text/plain; charset=utf-8")
        if request.path != SPEECH_PATH:
            return await self.send_bytes(send, 404 if request.method == "GET" else 405, b"")
        payload, failing = request.json, self.should_fail()
        if failing or not isinstance(payload, dict) or not isinstance(payload.get("input"), str) \
                or "model" not in payload:  # Kokoros: a body it cannot parse is a bare 500 too
            return await self.send_bytes(send, self.fail_status if failing else 500, b"",
                                         headers=self.failure_headers() if failing else ())
        known_voice = self.voices is None or payload.get("voice", "af_sky") in self.voices
        if payload.get("stream", True) is not False:
            return await self.stream(receive, send, self.pcm if known_voice else b"")
        if not known_voice:
            return await self.send_bytes(send, 500, b"")
        fmt = payload.get("response_format", "mp3")
        if fmt == "wav":
            samples = struct.unpack(f"<{len(self.pcm) // 2}h", self.pcm[: len(self.pcm) // 2 * 2])
            return await self.stream(receive, send, wav_float32_streaming([s / 32767 for s in samples]),
                                     "audio/wav")
        if fmt == "pcm":
            return await self.send_bytes(send, 200, self.pcm, "audio/pcm")
        await self.send_bytes(send, 200, b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb" * 64, "audio/mpeg")


class FakeKokoroFastAPI(FakeTTSServer):
    """Like remsky/Kokoro-FastAPI: `detail` errors, /health, 16-bit WAV for "wav"."""

    async def handle(self, request: RecordedRequest, receive: Receive, send: Send) -> None:
        if request.method == "GET" and request.path == "/health":
            return await self.send_json(send, 200, {"status": "healthy"})
        if request.path != SPEECH_PATH or request.method != "POST":
            return await self.send_json(send, 404, {"detail": "Not Found"})
        payload = request.json
        if not isinstance(payload, dict) or not isinstance(payload.get("input"), str):
            return await self.send_json(send, 422, {"detail": [
                {"type": "missing", "loc": ["body", "input"], "msg": "Field required", "input": None}]})
        speed = payload.get("speed", 1.0)
        if not 0.25 <= speed <= 4.0:
            return await self.send_json(send, 422, {"detail": [
                {"type": "less_than_equal" if speed > 4 else "greater_than_equal", "loc": ["body", "speed"],
                 "msg": f"Input should be {'less' if speed > 4 else 'greater'} than or equal to "
                        f"{4.0 if speed > 4 else 0.25}", "input": speed}]})
        if payload.get("model") not in ("kokoro", "tts-1", "tts-1-hd"):
            return await self.send_json(send, 400, {"detail": {
                "error": "invalid_model", "message": f"Unsupported model: {payload.get('model')}",
                "type": "invalid_request_error"}})
        voice = payload.get("voice", "af_heart")
        if self.voices is not None and voice not in self.voices:
            return await self.send_json(send, 400, {"detail": {
                "error": "validation_error",
                "message": f"Voice '{voice}' not found. Available voices: {', '.join(sorted(self.voices))}",
                "type": "invalid_request_error"}})
        if self.should_fail():
            return await self.send_json(send, self.fail_status, {"detail": {
                "error": "processing_error", "message": "Model not loaded", "type": "server_error"}},
                self.failure_headers())
        fmt = payload.get("response_format", "mp3")
        body, kind = (wav_s16(self.pcm), "audio/wav") if fmt == "wav" else (self.pcm, "audio/pcm")
        if fmt not in ("wav", "pcm"):
            body, kind = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb" * 64, "audio/mpeg"
        await self.stream(receive, send, body, kind)


class FakeOpenAI(FakeTTSServer):
    """Like api.openai.com: Bearer key, `{"error": {...}}` bodies, 429 with Retry-After."""

    def __init__(self, api_key: str = "sk-test-fake-key-0123456789", **options: Any) -> None:
        super().__init__(**options)
        self.api_key = api_key

    def _error(self, message: str, kind: str, code: str | None, param: str | None = None) -> dict[str, Any]:
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}

    async def handle(self, request: RecordedRequest, receive: Receive, send: Send) -> None:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return await self.send_json(send, 401, self._error(
                "You didn't provide an API key. You need to provide your API key in an Authorization "
                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).", "invalid_request_error", None))
        given = auth.removeprefix("Bearer ")
        if given != self.api_key:
            shown = f"{given[:3]}{'*' * 8}{given[-4:]}"
            return await self.send_json(send, 401, self._error(
                f"Incorrect API key provided: {shown}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.", "invalid_request_error", "invalid_api_key"))
        if request.method == "GET" and request.path == "/v1/models":
            return await self.send_json(send, 200, {"object": "list", "data": [
                {"id": "gpt-4o-mini-tts", "object": "model", "created": 0, "owned_by": "system"}]})
        if request.path != SPEECH_PATH or request.method != "POST":
            return await self.send_json(send, 404, self._error(
                f"Invalid URL ({request.method} {request.path})", "invalid_request_error", None))
        payload = request.json
        if not isinstance(payload, dict):
            return await self.send_json(send, 400, self._error(
                "We could not parse the JSON body of your request.", "invalid_request_error", None))
        if len(payload.get("input", "")) > 4096:
            return await self.send_json(send, 400, self._error(
                "string too long", "invalid_request_error", "string_above_max_length", "input"))
        if self.voices is not None and payload.get("voice") not in self.voices:
            return await self.send_json(send, 400, self._error(
                f"Invalid value: '{payload.get('voice')}'.", "invalid_request_error", "invalid_value", "voice"))
        if self.should_fail():
            if self.fail_status == 429:
                error = self._error("Rate limit reached for requests. Please try again later.",
                                    "requests", "rate_limit_exceeded")
            else:
                error = self._error("The server had an error while processing your request. Sorry about that!",
                                    "server_error", None)
            return await self.send_json(send, self.fail_status, error, self.failure_headers())
        await self.stream(receive, send, self.pcm, "audio/pcm")
