"""A Kokoros-like speech server on loopback that misbehaves on purpose, one way per mode.

Built on `FakeTTSServer` (tests/fakes/tts_servers.py): the same hypercorn trio worker on
127.0.0.1 port 0, the same request log, `client_left` and `disconnects`. GET / answers
"OK" (so health checks pass); POST /v1/audio/speech answers according to `fault`, which
a test may change between requests (None = a healthy answer of `pcm`):

    "trickle"           200 audio/pcm, then one byte of `pcm` every `trickle_interval` s,
                        forever: never silent long enough for a stall timeout
    "endless"           200 audio/pcm, then `pcm` again and again as fast as the client
                        reads, forever
    "lying_wav"         200 audio/wav whose header claims `wav_rate` Hz (1, 0, 10 MHz...),
                        then `pcm` (4.8 KB by default) as its data
    "html"              200 text/html: a captive portal's page
    "json_as_pcm"       200 with content type audio/pcm whose body is an OpenAI-style JSON
                        error
    "stall_headers"     reads the request, then sends nothing at all (not even headers)
                        until the client leaves
    "close_mid_sample"  200 audio/pcm, an odd number of bytes of `pcm`, then the
                        connection is dropped without ending the body
    "odd_end"           200 audio/pcm, an odd number of bytes of `pcm`, then a clean end

Every mode stops as soon as the client leaves (counted in `disconnects`, `client_left`).
Do not use `trio.testing.MockClock` with it (hypercorn's timers would jump).
"""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio

from tests.fakes.tts_servers import SPEECH_PATH, FakeTTSServer, Receive, RecordedRequest, Send, _BreakOff, tone

HTML_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Guest Wi-Fi</title></head>"
             b"<body><h1>Please sign in to continue</h1></body></html>")
JSON_ERROR = json.dumps({"error": {"message": "The engine is currently overloaded, please try again later",
                                   "type": "server_error", "param": None, "code": "engine_overloaded"}}).encode()
FAULTS = ("trickle", "endless", "lying_wav", "html", "json_as_pcm", "stall_headers", "close_mid_sample", "odd_end")


def lying_wav_header(rate: int, data_bytes: int) -> bytes:
    """A 16-bit mono WAV header that claims `rate` Hz (byte rate and sizes to match)."""
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1, 1,
                       rate, rate * 2, 2, 16, b"data", data_bytes)


@dataclass
class FaultyServer(FakeTTSServer):
    """A Kokoros-like server answering speech requests with the fault named by `fault`."""

    fault: str | None = None
    pcm: bytes = field(default_factory=lambda: tone(100))  # 100 ms = 4800 bytes at 24 kHz
    trickle_interval: float = 0.2
    wav_rate: int = 1
    sent: int = 0  # body bytes sent, over all requests

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fault not in (None, *FAULTS):
            raise ValueError(f"unknown fault {self.fault!r}; one of {', '.join(FAULTS)}")

    async def handle(self, request: RecordedRequest, receive: Receive, send: Send) -> None:
        if request.method == "GET" and request.path == "/":
            return await self.send_bytes(send, 200, b"OK")
        if request.path != SPEECH_PATH:
            return await self.send_bytes(send, 404, b"")
        match self.fault:
            case None:
                await self.stream(receive, send, self.pcm)
            case "trickle":
                await self._answer(receive, send, "audio/pcm", self._trickle())
            case "endless":
                await self._answer(receive, send, "audio/pcm", self._endless())
            case "lying_wav":
                await self._answer(receive, send, "audio/wav",
                                   _once(lying_wav_header(self.wav_rate, len(self.pcm)) + self.pcm))
            case "html":
                await self.send_bytes(send, 200, HTML_PAGE, "text/html; charset=utf-8")
            case "json_as_pcm":
                await self.send_bytes(send, 200, JSON_ERROR, "audio/pcm")
            case "stall_headers":
                await self._wait_for_disconnect(receive)
            case "close_mid_sample":
                await self._answer(receive, send, "audio/pcm", _once(self.pcm[:len(self.pcm) // 2 | 1]),
                                   break_off=True)
            case "odd_end":
                await self._answer(receive, send, "audio/pcm", _once(self.pcm[:len(self.pcm) // 2 | 1]))

    async def _trickle(self) -> AsyncIterator[bytes]:
        for byte in itertools.cycle(self.pcm):
            yield bytes([byte])
            await trio.sleep(self.trickle_interval)

    async def _endless(self) -> AsyncIterator[bytes]:
        while True:
            yield self.pcm

    async def _wait_for_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnects += 1
        self.client_left.set()

    async def _answer(self, receive: Receive, send: Send, content_type: str, body: AsyncIterator[bytes],
                      *, break_off: bool = False) -> None:
        """Send headers, then `body` chunked; end it cleanly, or drop the connection."""
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type.encode())]})
        async with trio.open_nursery() as nursery:

            async def watch_for_disconnect() -> None:
                await self._wait_for_disconnect(receive)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_for_disconnect)
            async for piece in body:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                self.sent += len(piece)
                await trio.lowlevel.checkpoint()  # an endless body must not starve the watcher
            if break_off:
                raise _BreakOff(f"breaking off after {self.sent} bytes")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            nursery.cancel_scope.cancel()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
