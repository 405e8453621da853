"""The OpenAI-compatible streaming speech client, configured as two providers: kokoros, openai.

Both servers take `POST {base_url}/v1/audio/speech` and answer PCM s16le mono at 24 kHz,
streamed; this module sends that request with httpx, passes the audio on as it arrives
and turns every way the exchange can go wrong into a typed `pipeline.errors` error whose
message says what happened and what to do.

Decisions (see DESIGN.md section 5):
- A refused connection (nothing listening, unknown host) is `ProviderUnavailable` and is
  not retried: the fallback provider speaks at once and the circuit breaker learns.
- Connect, first-byte and stall timeouts are `ProviderTimeout`; an HTTP error status is
  `ProviderHTTPError` with the server's own message; a 200 without audio (Kokoros' answer
  to an unknown voice) is `ProviderEmptyAudio`; a body that breaks off is `ProviderFailed`.
  (The total time and the amount of audio of a piece are bounded for every provider by
  `pipeline.speaking`, see `pipeline.piece_bounds`.)
- Content, not the provider: a 400, 413 or 422 says the server refused THIS request (the
  text, or a voice or speed the client chose), so it is `InputRefused` (an
  `UnspeakableText`, which the circuit breaker does not count). 401/403/404/5xx,
  timeouts and broken bodies are the provider's fault.
- A 200 whose body is text (a JSON error, a proxy's HTML page; by content type or by its
  first bytes, see `speech_body`) is `ProviderFailed` with the server's own message.
- Retries (exponential backoff with jitter, or the server's `Retry-After` up to
  `retry_after_cap`) happen only before any audio was yielded, at most `max_retries`
  times, and never for a 4xx other than 408 and 429, an empty answer or a refused
  connection.
- The body is sniffed: raw PCM passes through untouched; a RIFF/WAVE body (Kokoros
  without `stream`, or a server that ignores `response_format`) is converted to s16le
  mono 24 kHz incrementally, read until EOF whatever its size fields say.
- OpenAI gets no `stream` field (its API has none: it always streams); Kokoros needs
  `"stream": true` or it answers a whole WAV file at the end.

The body of an answer (raw PCM, or WAV converted as it arrives) is decoded by
`speech_body.SpeechBodyDecoder`.

(Over 300 lines on purpose: one request and every way it can go wrong — connecting, the
status, the body, retries — are read together.)
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any, Final, cast

import httpx
import structlog
import trio

from pipeline import __version__
from pipeline.commands import TTSProvider
from pipeline.config import Settings
from pipeline.errors import (
    InputRefused,
    ProviderEmptyAudio,
    ProviderError,
    ProviderFailed,
    ProviderHTTPError,
    ProviderTimeout,
    ProviderUnavailable,
)
from pipeline.providers.base import Provider
from pipeline.providers.speech_body import (
    SAMPLE_RATE,
    NotAudioBody,
    SpeechBodyDecoder,
    permanent_failure,
)

SPEECH_PATH: Final = "/v1/audio/speech"
BACKOFF_BASE: Final = 0.25  # first retry after 0.25–0.5 s, then 0.5–1 s, …
ERROR_BODY_LIMIT: Final = 64 * 1024  # past this an error page only repeats itself
# Statuses that refuse the request itself (bad or too long input), not a sick server.
INPUT_REFUSED: Final = frozenset({400, 413, 422})
DETAIL_LIMIT: Final = 300  # characters of a server's error message worth showing
LABELS: Final = {TTSProvider.KOKOROS: "Kokoros", TTSProvider.OPENAI: "OpenAI"}
START_HINTS: Final = {
    TTSProvider.KOKOROS: "start `koko openai` (or Kokoro-FastAPI) there or set SPEECHCAST_KOKOROS_URL",
    TTSProvider.OPENAI: "check the network or set SPEECHCAST_OPENAI_URL",
}
# An OpenAI-style key as a server might echo it back (OpenAI shows a masked form).
KEY_PATTERN: Final = re.compile(r"\bsk-[A-Za-z0-9_\-*.]{4,}")

log = structlog.get_logger(__name__)


class OpenAICompatProvider(Provider):
    """A provider speaking the OpenAI speech API over HTTP (Kokoros, Kokoro-FastAPI, OpenAI).

    Resource handling: `open` creates one `httpx.AsyncClient` (idempotent), `aclose`
    closes it; a `trio.CapacityLimiter` of `settings.http_parallel` bounds the requests
    in flight. Leaving a `synthesize` iterator early (cancellation, `aclose`) closes its
    connection at once, so the server stops working on it.

    Error handling: every failure is a `ProviderError` (see the module docstring); the
    API key appears in no message, log line or repr.
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, name: TTSProvider, *, base_url: str, model: str, voice: str, speed: float,
                 api_key: str | None, settings: Settings,
                 transport: httpx.AsyncBaseTransport | None = None, check_path: str,
                 send_stream_flag: bool = True) -> None:
        self.name = name
        # "https://api.openai.com/v1" is how the OpenAI SDKs spell the base; accept it too.
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model = model
        self.default_voice = voice
        self.default_speed = speed
        self.max_parallel = settings.http_parallel
        self._api_key = api_key
        self._settings = settings
        self._transport = transport
        self._check_path = check_path
        self._send_stream_flag = send_stream_flag
        self._limiter = trio.CapacityLimiter(settings.http_parallel)
        self._client: httpx.AsyncClient | None = None
        self._random = random.Random()
        self._label = LABELS.get(name, str(name.value))
        self._hint = START_HINTS.get(name, f"set SPEECHCAST_{name.value.upper()}_URL")

    def __repr__(self) -> str:
        key = "set" if self._api_key else "not set"
        return (f"OpenAICompatProvider({self.name.value!r}, base_url={self.base_url!r}, "
                f"model={self.model!r}, voice={self.default_voice!r}, api_key={key})")

    def unavailable_reason(self) -> str | None:
        if self.name is TTSProvider.OPENAI and not self._api_key:
            return ("OPENAI_API_KEY is not set; set it in the daemon's environment to use "
                    "the openai provider")
        return None

    async def open(self) -> None:
        if self._client is None:
            s = self._settings
            # httpx only times the connect; the first-byte and stall limits are trio
            # deadlines around each read, so they follow trio's (mock) clock.
            timeout = httpx.Timeout(None, connect=s.connect_timeout)
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=s.http_parallel)
            self._client = httpx.AsyncClient(
                transport=self._transport, timeout=timeout, limits=limits, follow_redirects=False,
                headers={"user-agent": f"speechcast/{__version__}"})

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def check(self) -> None:
        """GET the health path: any answer below 500 means reachable, except a rejected key.

        Error handling: raises `ProviderUnavailable` naming the URL and what to do.
        """
        if reason := self.unavailable_reason():
            raise ProviderUnavailable(reason)
        await self.open()
        assert self._client is not None
        url = self.base_url + self._check_path
        limit = self._settings.connect_timeout + self._settings.first_byte_timeout
        try:
            with trio.move_on_after(limit) as waiting:
                response = await self._client.get(url, headers=self._auth_headers())
        except httpx.HTTPError as error:
            raise ProviderUnavailable(self._transport_message(error)) from error
        if waiting.cancelled_caught:
            raise ProviderUnavailable(f"{self._label} at {url} did not answer within {limit:g} s; {self._hint}")
        status = response.status_code
        if status in (401, 403):
            detail = self._scrub(_error_detail(response.content))
            raise ProviderUnavailable(f"{self._label} at {url} refused access (HTTP {status}: "
                                      f"{detail or 'no details'}); {self._auth_hint()}")
        if status >= 500:
            raise ProviderUnavailable(f"{self._label} at {url} is not healthy (HTTP {status}); "
                                      "look at the server's log")

    async def synthesize(self, text: str, voice: str | None = None,
                         speed: float | None = None) -> AsyncGenerator[bytes, None]:
        """Yield PCM s16le mono 24 kHz bytes for `text` as they arrive from the server."""
        if reason := self.unavailable_reason():
            raise ProviderUnavailable(reason)
        await self.open()
        voice = voice or self.default_voice
        payload: dict[str, Any] = {"model": self.model, "input": text, "voice": voice,
                                   "response_format": "pcm",
                                   "speed": self.default_speed if speed is None else speed}
        if self._send_stream_flag:
            payload["stream"] = True
        # A token of our own, so the slot is released even if the generator is finalized
        # by another task than the one that started it.
        borrower = object()
        # The slot is kept through retry waits: a server that asked us to wait gains
        # nothing from the same daemon's other requests.
        await self._limiter.acquire_on_behalf_of(borrower)
        try:
            for attempt in itertools.count():
                yielded = False
                try:
                    async with aclosing(self._stream_once(payload, voice)) as pieces:
                        async for piece in pieces:
                            yielded = True
                            yield piece
                    return
                except ProviderError as error:
                    if yielded or attempt >= self._settings.max_retries or not _worth_retrying(error):
                        raise
                    delay = self._retry_delay(attempt, error)
                    log.info("provider.retrying", provider=self.name.value, attempt=attempt + 1,
                             delay_s=round(delay, 3), error=error.message)
                    await trio.sleep(delay)
        finally:
            self._limiter.release_on_behalf_of(borrower)

    async def _stream_once(self, payload: dict[str, Any], voice: str) -> AsyncGenerator[bytes, None]:
        """One request: yield converted audio; raise a `ProviderError` on any trouble."""
        assert self._client is not None
        s = self._settings
        url = self.base_url + SPEECH_PATH
        request = self._client.build_request("POST", url, json=payload, headers=self._auth_headers())
        deadline = trio.current_time() + s.first_byte_timeout
        response: httpx.Response | None = None
        try:
            with trio.move_on_at(deadline):
                try:
                    response = await self._client.send(request, stream=True)
                except httpx.HTTPError as error:
                    raise self._transport_error(error) from error
            if response is None:
                raise self._first_byte_timeout()
            if response.status_code >= 300:
                raise await self._http_error(response, deadline)
            content_type = response.headers.get("content-type")
            received = produced = 0
            async with aclosing(_generator(response.aiter_bytes())) as body:
                try:
                    decoder = SpeechBodyDecoder(self._label, content_type)
                    while True:
                        if produced:
                            deadline = trio.current_time() + s.stall_timeout
                        data = await self._read(body, deadline, produced, received)
                        if data is None:
                            break
                        received += len(data)
                        audio = decoder.feed(data)
                        if audio:
                            produced += len(audio)
                            yield audio
                    tail = decoder.finish()
                except NotAudioBody as text:
                    raise await self._text_answer(text, body, content_type) from None
            if tail:
                produced += len(tail)
                yield tail
            if not produced:
                raise ProviderEmptyAudio(
                    f"{self._label} answered without any audio for voice {voice!r}; the voice may be "
                    f"unknown to the server (check SPEECHCAST_{self.name.value.upper()}_VOICE)")
        finally:
            if response is not None:
                # Closing an unfinished streamed response drops its connection: that is
                # what tells the server to stop. Shielded so a cancelled caller still does it.
                with trio.CancelScope(shield=True):
                    await response.aclose()

    async def _read(self, body: AsyncIterator[bytes], deadline: float, produced: int,
                    received: int) -> bytes | None:
        """The next piece of the body, or None at its end; timeouts and break-offs raise."""
        with trio.move_on_at(deadline):
            try:
                return await body.__anext__()
            except StopAsyncIteration:
                return None
            except httpx.HTTPError as error:
                raise ProviderFailed(
                    f"the connection to {self._label} broke off after {received} bytes of the answer "
                    f"({_describe(error)}); the server may have crashed or restarted") from error
        if not produced:
            raise self._first_byte_timeout()
        raise ProviderTimeout(f"{self._label} stopped sending audio for {self._settings.stall_timeout:g} s "
                              f"in the middle of an answer (stall_timeout); the server may be overloaded")

    async def _text_answer(self, text: NotAudioBody, body: AsyncIterator[bytes],
                           content_type: str | None) -> ProviderFailed:
        """Build the error for a 200 whose body is text, with the server's message if it has one."""
        raw = text.head + await _read_some(body, trio.current_time() + self._settings.stall_timeout,
                                           ERROR_BODY_LIMIT - len(text.head))
        detail = self._scrub(_error_detail(raw))
        sniffed = "/" not in text.kind  # found by its first bytes, not by its content type
        shown = f" (sent as {content_type})" if sniffed and content_type else ""
        return permanent_failure(
            f"{self._label} answered HTTP 200 with {text.kind}{shown} instead of audio"
            + (f": {detail}" if detail else "") + "; the server (or a proxy in front of it) is not sending speech")

    async def _http_error(self, response: httpx.Response, deadline: float) -> ProviderHTTPError:
        """Build the error for an HTTP error status, with the body's message if it has one."""
        async with aclosing(_generator(response.aiter_bytes())) as body:
            raw = await _read_some(body, deadline, ERROR_BODY_LIMIT)
        status = response.status_code
        detail = self._scrub(_error_detail(raw))
        message = f"{self._label} answered HTTP {status}" + (f": {detail}" if detail else " with no details")
        if status in (401, 403):
            message += f"; {self._auth_hint()}"
        elif status == 404:
            message += f"; is {self.base_url} an OpenAI-compatible speech server? ({self._hint})"
        elif 300 <= status < 400:
            message += f" (redirect to {response.headers.get('location', '?')}); set the URL to where it points"
        elif not detail and status >= 500 and self.name is TTSProvider.KOKOROS:
            message += " (Kokoros reports every error this way; its log says what went wrong)"
        if status in INPUT_REFUSED:
            return InputRefused(message, status=status, retry_after=_retry_after(response))
        return ProviderHTTPError(message, status=status, retry_after=_retry_after(response))

    def _transport_error(self, error: httpx.HTTPError) -> ProviderError:
        if isinstance(error, httpx.ConnectTimeout):
            return ProviderTimeout(self._transport_message(error))
        if isinstance(error, (httpx.ConnectError, httpx.UnsupportedProtocol, httpx.ProxyError)):
            return ProviderUnavailable(self._transport_message(error))
        return ProviderFailed(f"the request to {self._label} at {self.base_url} failed before an answer "
                              f"({_describe(error)})")

    def _transport_message(self, error: httpx.HTTPError) -> str:
        if isinstance(error, httpx.TimeoutException):
            return (f"could not connect to {self._label} at {self.base_url} within "
                    f"{self._settings.connect_timeout:g} s; {self._hint}")
        return f"{self._label} is not reachable at {self.base_url} ({_describe(error)}); {self._hint}"

    def _first_byte_timeout(self) -> ProviderTimeout:
        return ProviderTimeout(f"{self._label} sent no audio within {self._settings.first_byte_timeout:g} s "
                               "(first_byte_timeout); the server may be overloaded")

    def _retry_delay(self, attempt: int, error: ProviderError) -> float:
        if error.retry_after is not None:
            return min(error.retry_after, self._settings.retry_after_cap)
        step = BACKOFF_BASE * 2.0**attempt
        # Random jitter keeps many clients that failed together from retrying together.
        return step + self._random.uniform(0, step)

    def _auth_hint(self) -> str:
        if self._api_key:
            return "the API key was rejected: check OPENAI_API_KEY"
        return f"the server wants credentials, which speechcast does not send to {self._label}"

    def _auth_headers(self) -> httpx.Headers:
        # httpx.Headers hides Authorization in its repr, so tracebacks and locals stay clean.
        return httpx.Headers({"authorization": f"Bearer {self._api_key}"} if self._api_key else {})

    def _scrub(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return KEY_PATTERN.sub("sk-***", text)


def kokoros_provider(settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> OpenAICompatProvider:
    """The Kokoros (or Kokoro-FastAPI) server at `settings.kokoros_url`; no key."""
    return OpenAICompatProvider(
        TTSProvider.KOKOROS, base_url=settings.kokoros_url, model=settings.kokoros_model,
        voice=settings.kokoros_voice, speed=settings.kokoros_speed, api_key=None,
        settings=settings, transport=transport, check_path="/")


def openai_provider(settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> OpenAICompatProvider:
    """The OpenAI speech API at `settings.openai_url` with `OPENAI_API_KEY`."""
    return OpenAICompatProvider(
        TTSProvider.OPENAI, base_url=settings.openai_url, model=settings.openai_model,
        voice=settings.openai_voice, speed=settings.openai_speed, api_key=settings.openai_api_key,
        settings=settings, transport=transport, check_path="/v1/models", send_stream_flag=False)


def _worth_retrying(error: ProviderError) -> bool:
    # Nothing listening and "no audio for this voice" will be the same a moment later.
    if isinstance(error, (ProviderUnavailable, ProviderEmptyAudio)):
        return False
    return error.retryable


def _retry_after(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds (the form speech APIs use); None if absent or a date."""
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _generator(pieces: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    # httpx types its body iterators loosely; they are async generators (they have aclose).
    return cast(AsyncGenerator[bytes, None], pieces)


async def _read_some(body: AsyncIterator[bytes], deadline: float, limit: int) -> bytes:
    """Up to about `limit` bytes of a body (an error message), whatever arrives by `deadline`."""
    raw = bytearray()
    with trio.move_on_at(deadline):
        try:
            async for piece in body:
                raw += piece
                if len(raw) > limit:
                    break
        except httpx.HTTPError:
            pass  # what arrived (or the status alone) still says what happened
    return bytes(raw)


def _describe(error: Exception) -> str:
    return str(error) or type(error).__name__


def _error_detail(raw: bytes) -> str:
    """The human part of an error body: OpenAI's `error.message`, FastAPI's `detail`, or text."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return _shorten(text)
    if isinstance(data, dict):
        error, detail = data.get("error"), data.get("detail")
        if isinstance(error, dict) and error.get("message"):  # OpenAI
            code = error.get("code") or error.get("type")
            return _shorten(f"{error['message']} ({code})" if code else str(error["message"]))
        if isinstance(detail, dict):  # Kokoro-FastAPI: {"error","message","type"}
            return _shorten(str(detail.get("message") or detail.get("error") or detail))
        if isinstance(detail, list):  # FastAPI validation (422): [{"loc","msg","type"}]
            parts = [f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" if isinstance(d, dict) else str(d)
                     for d in detail]
            return _shorten("; ".join(parts))
        for value in (detail, error, data.get("message")):
            if isinstance(value, str) and value:
                return _shorten(value)
    return _shorten(text)


def _shorten(text: str) -> str:
    if text.startswith("<"):  # an HTML error page from a proxy: keep its words
        text = re.sub(r"<[^>]*>", " ", text)
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_LIMIT else text[: DETAIL_LIMIT - 1] + "…"
