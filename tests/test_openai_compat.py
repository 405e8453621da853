"""The OpenAI-compatible HTTP provider below the network, with httpx.MockTransport.

Each test scripts what the server answers and asserts what the router (the provider's
user) would see: the bytes yielded, the typed error and its message, how many requests
were made, and — with the autojump MockClock — how long the provider waited.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing
from typing import TypeVar

import httpx
import pytest
import structlog
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

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
from pipeline.providers.breaker import BreakerState, CircuitBreaker
from pipeline.providers.openai_compat import OpenAICompatProvider, kokoros_provider, openai_provider
from pipeline.providers.speech_body import TEXT_SNIFF_BYTES, NotAudioBody, SpeechBodyDecoder
from tests.fakes.tts_servers import tone, wav_float32_streaming, wav_s16

KEY = "sk-proj-TOPSECRET0123456789abcdefXYZ"
KOKOROS = "http://kokoros.test:3000"
OPENAI = "https://api.openai.test"
PCM = tone(20)

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def make_settings(**changes: object) -> Settings:
    values: dict[str, object] = dict(
        kokoros_url=KOKOROS, openai_url=OPENAI, openai_api_key=KEY, connect_timeout=1.0,
        first_byte_timeout=4.0, stall_timeout=2.0, max_retries=2, retry_after_cap=10.0, http_parallel=2)
    values.update(changes)
    return Settings(**values)  # type: ignore[arg-type]


class Server:
    """A scripted server: answers come from `answer(request, n)` (n counts from 1)."""

    def __init__(self, answer: Callable[[httpx.Request, int], Awaitable[httpx.Response] | httpx.Response]) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self._handle)

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        result = self.answer(request, len(self.requests))
        return await result if not isinstance(result, httpx.Response) else result

    def kokoros(self, **changes: object) -> OpenAICompatProvider:
        return kokoros_provider(make_settings(**changes), transport=self.transport)

    def openai(self, **changes: object) -> OpenAICompatProvider:
        return openai_provider(make_settings(**changes), transport=self.transport)


class Body(httpx.AsyncByteStream):
    """A response body sent piece by piece; `None` in the pieces means "then hang"."""

    def __init__(self, pieces: Iterable[bytes | None | Exception]) -> None:
        self.pieces = list(pieces)
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            if piece is None:
                await trio.sleep_forever()
            elif isinstance(piece, Exception):
                raise piece
            else:
                yield piece

    async def aclose(self) -> None:
        self.closed = True


def audio(*pieces: bytes | None | Exception, content_type: str = "audio/pcm") -> httpx.Response:
    return httpx.Response(200, headers={"content-type": content_type}, stream=Body(pieces))


def pcm_answer(request: httpx.Request, n: int) -> httpx.Response:
    return audio(PCM)


async def collect(provider: OpenAICompatProvider, text: str = "Hello there.", voice: str | None = None,
                  speed: float | None = None) -> list[bytes]:
    async with aclosing(provider.synthesize(text, voice, speed)) as stream:
        return [piece async for piece in stream]


E = TypeVar("E", bound=ProviderError)


async def fail(provider: OpenAICompatProvider, error: type[E]) -> E:
    with pytest.raises(error) as caught:
        await collect(provider)
    return caught.value


# -- the request ------------------------------------------------------------------------


async def test_kokoros_request_asks_for_streamed_pcm_without_auth() -> None:
    server = Server(pcm_answer)
    await collect(server.kokoros())
    (request,) = server.requests
    assert request.method == "POST"
    assert str(request.url) == f"{KOKOROS}/v1/audio/speech"
    assert json.loads(request.content) == {"model": "kokoro", "input": "Hello there.", "voice": "af_heart",
                                           "response_format": "pcm", "speed": 1.0, "stream": True}
    assert "authorization" not in request.headers


async def test_openai_request_carries_the_key_and_the_callers_voice_and_speed() -> None:
    server = Server(pcm_answer)
    await collect(server.openai(openai_url=OPENAI + "/v1/"), voice="nova", speed=1.5)
    (request,) = server.requests
    assert str(request.url) == f"{OPENAI}/v1/audio/speech"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert json.loads(request.content) == {"model": "gpt-4o-mini-tts", "input": "Hello there.", "voice": "nova",
                                           "response_format": "pcm", "speed": 1.5}


# -- the audio --------------------------------------------------------------------------


async def test_pcm_is_passed_on_piece_by_piece_as_it_arrives() -> None:
    second_may_come = trio.Event()
    pieces = [PCM[:1], PCM[1:4], PCM[4:]]

    class Gated(Body):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield pieces[0]
            await second_may_come.wait()
            for piece in pieces[1:]:
                yield piece

    server = Server(lambda request, n: httpx.Response(200, stream=Gated([])))
    received = []
    async with aclosing(server.kokoros().synthesize("Hi.", None, None)) as stream:
        async for piece in stream:
            received.append(piece)
            second_may_come.set()  # only reachable if the first piece came before the body ended
    assert received == pieces


async def test_wav_float32_with_streaming_sizes_is_converted_and_read_to_the_end() -> None:
    samples = [0.0, 0.5, -0.5, 1.0, -1.0, 1.5, -2.0, 0.25]
    wav = wav_float32_streaming(samples)
    pieces = [wav[:3], wav[3:17], wav[17:45], wav[45:47], wav[47:]]  # cuts inside the header and samples
    server = Server(lambda request, n: audio(*pieces, content_type="audio/wav"))
    out = b"".join(await collect(server.kokoros()))
    assert struct.unpack(f"<{len(samples)}h", out) == (0, 16384, -16384, 32767, -32767, 32767, -32767, 8192)


async def test_wav_16bit_passes_samples_through_skipping_other_chunks_and_size_fields() -> None:
    plain = wav_s16(PCM)
    # A LIST chunk before the data, and a data size of 0 as some streaming writers send.
    wav = plain[:36] + b"LIST" + struct.pack("<I", 5) + b"INFO\x00\x00" + b"data" + struct.pack("<I", 0) + PCM
    server = Server(lambda request, n: audio(*(wav[i:i + 7] for i in range(0, len(wav), 7))))
    assert b"".join(await collect(server.kokoros())) == PCM


async def test_stereo_wav_is_mixed_down_to_mono() -> None:
    frames = struct.pack("<6h", 1000, 3000, -200, -400, 7, 8)
    server = Server(lambda request, n: audio(wav_s16(frames, channels=2)))
    assert struct.unpack("<3h", b"".join(await collect(server.kokoros()))) == (2000, -300, 8)


async def test_wav_at_another_rate_is_resampled_to_24_khz() -> None:
    one_second = tone(1000, rate=22050)
    server = Server(lambda request, n: audio(wav_s16(one_second, rate=22050)))
    out = b"".join(await collect(server.kokoros()))
    assert abs(len(out) // 2 - 24000) <= 24  # one second stays one second (within a millisecond)


@pytest.mark.parametrize("content_type, body, named", [
    ("audio/mpeg", b"\xff\xfb\x90\x00" * 10, "audio/mpeg"),
    ("application/octet-stream", b"ID3\x04\x00" + b"\x00" * 40, "mp3"),
])
async def test_an_answer_that_is_not_pcm_or_wav_fails_clearly(content_type: str, body: bytes, named: str) -> None:
    server = Server(lambda request, n: audio(body, content_type=content_type))
    error = await fail(server.kokoros(), ProviderFailed)
    assert named in error.message and "pcm" in error.message
    assert len(server.requests) == 1


OPENAI_ERROR = json.dumps({"error": {"message": "The server had an error while processing your request.",
                                     "type": "server_error", "param": None, "code": None}}).encode()
FASTAPI_ERROR = json.dumps({"detail": {"error": "processing_error", "message": "Model not loaded",
                                       "type": "server_error"}}).encode()
HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Welcome</title></head><body><h1>Sign in to the Wi-Fi</h1></body></html>"


@pytest.mark.parametrize("content_type, body, kind, message", [
    ("audio/pcm", OPENAI_ERROR, "JSON (sent as audio/pcm)", "The server had an error while processing your request."),
    ("audio/pcm", FASTAPI_ERROR, "JSON (sent as audio/pcm)", "Model not loaded"),
    (None, b'  {"detail": "Not Found"}', "JSON", "Not Found"),
    ("audio/pcm", HTML_PAGE, "an HTML page (sent as audio/pcm)", "Welcome Sign in to the Wi-Fi"),
    ("application/octet-stream", b"Internal Server Error, please try again later.",
     "text (sent as application/octet-stream)", "Internal Server Error"),
    ("application/json; charset=utf-8", FASTAPI_ERROR, "application/json", "Model not loaded"),
    ("text/html", HTML_PAGE, "text/html", "Welcome Sign in to the Wi-Fi"),
    ("text/plain", b"OK", "text/plain", "OK"),
])
async def test_a_200_that_is_text_fails_with_the_servers_message_and_no_audio(
        content_type: str | None, body: bytes, kind: str, message: str) -> None:
    # Cut into 1-byte pieces: sniffing must hold its verdict across any split.
    headers = {"content-type": content_type} if content_type else {}
    server = Server(lambda request, n: httpx.Response(200, headers=headers,
                                                      stream=Body([body[i:i + 1] for i in range(len(body))])))
    received: list[bytes] = []
    with pytest.raises(ProviderFailed) as caught:
        async with aclosing(server.kokoros().synthesize("Hi.", None, None)) as stream:
            async for piece in stream:
                received.append(piece)
    assert received == []
    assert f"Kokoros answered HTTP 200 with {kind} instead of audio: {message}" in caught.value.message
    assert not caught.value.retryable and len(server.requests) == 1


async def test_a_text_answer_echoing_the_key_does_not_show_it() -> None:
    echo = json.dumps({"error": {"message": f"Key {KEY} has no access to speech.", "code": "no_access"}}).encode()
    server = Server(lambda request, n: audio(echo))
    error = await fail(server.openai(), ProviderFailed)
    assert "no access to speech" in error.message and KEY not in error.message


def decode(body: bytes, cuts: list[int], content_type: str | None = "audio/pcm") -> bytes:
    decoder = SpeechBodyDecoder("Test", content_type)
    edges = [0, *sorted({c for c in cuts if 0 < c < len(body)}), len(body)]
    out = b"".join(decoder.feed(body[a:b]) for a, b in zip(edges, edges[1:], strict=False))
    return out + decoder.finish()


printable = st.binary(min_size=1, max_size=200).map(lambda b: bytes(0x20 + x % 0x5F for x in b))
cuts = st.lists(st.integers(min_value=0, max_value=300), max_size=8)


@given(body=st.binary(min_size=1, max_size=400), where=st.integers(min_value=0, max_value=TEXT_SNIFF_BYTES - 1),
       byte=st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, 0x1F]), cuts=cuts)
def test_pcm_with_any_non_printable_byte_early_passes_bit_exact_in_any_split(body: bytes, where: int, byte: int,
                                                                             cuts: list[int]) -> None:
    # Real PCM starts near silence (0x00/0xFF bytes): the sniffer must never eat or delay it.
    body = bytearray(body + bytes(TEXT_SNIFF_BYTES))
    body[min(where, len(body) - 1)] = byte
    if body.startswith((b"RIFF", b"\xef\xbb\xbf")) or body[:1] == b"R":
        body[0] = 0
    assert decode(bytes(body), cuts) == bytes(body)


@given(text=printable, cuts=cuts, content_type=st.sampled_from(["audio/pcm", None, "application/octet-stream"]))
def test_a_body_of_printable_ascii_is_never_played(text: bytes, cuts: list[int], content_type: str | None) -> None:
    with pytest.raises(NotAudioBody):
        decode(text, cuts, content_type)


@pytest.mark.parametrize("rate, channels, named", [
    (1, 1, "claiming 1 Hz"), (0, 1, "claiming 0 Hz"), (7999, 1, "claiming 7999 Hz"),
    (10_000_000, 1, "claiming 10000000 Hz"), (48001, 1, "claiming 48001 Hz"), (24000, 100, "claiming 100 channels"),
    (24000, 0, "claiming 0 channels"),
])
async def test_a_wav_header_with_an_impossible_rate_or_channel_count_is_refused(rate: int, channels: int,
                                                                                named: str) -> None:
    # 4.8 KB claiming 1 Hz would otherwise be resampled into 40 minutes of audio.
    wav = bytearray(wav_s16(tone(100)))
    struct.pack_into("<HI", wav, 22, channels, rate)
    server = Server(lambda request, n: audio(bytes(wav), content_type="audio/wav"))
    error = await fail(server.kokoros(), ProviderFailed)
    assert named in error.message
    assert len(server.requests) == 1


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
async def test_wav_at_every_speech_rate_is_accepted(rate: int) -> None:
    server = Server(lambda request, n: audio(wav_s16(tone(50, rate=rate), rate=rate), content_type="audio/wav"))
    out = b"".join(await collect(server.kokoros()))
    assert abs(len(out) // 2 - 1200) <= 24


async def test_a_wav_header_cut_inside_a_sample_drops_only_the_half_sample() -> None:
    wav = wav_s16(PCM)
    server = Server(lambda request, n: audio(wav[:-1], content_type="audio/wav"))
    assert b"".join(await collect(server.kokoros())) == PCM[:-2]


async def test_a_wav_encoding_it_cannot_read_fails_clearly_and_is_not_retried() -> None:
    eight_bit = bytearray(wav_s16(PCM))
    struct.pack_into("<HH", eight_bit, 32, 1, 8)  # block align 1, 8 bits per sample
    server = Server(lambda request, n: audio(bytes(eight_bit), content_type="audio/wav"))
    error = await fail(server.kokoros(), ProviderFailed)
    assert "8-bit" in error.message
    assert len(server.requests) == 1


async def test_an_empty_200_says_the_voice_may_be_unknown_and_is_not_retried() -> None:
    server = Server(lambda request, n: audio())
    error = await fail(server.kokoros(), ProviderEmptyAudio)
    assert "af_heart" in error.message and "unknown" in error.message
    assert len(server.requests) == 1


# -- HTTP errors ------------------------------------------------------------------------


def answer_json(status: int, data: object, **headers: str) -> Callable[[httpx.Request, int], httpx.Response]:
    return lambda request, n: httpx.Response(status, json=data, headers=headers)


@pytest.mark.parametrize("answer, status, expected", [
    (lambda r, n: httpx.Response(500), 500, "Kokoros answered HTTP 500 with no details"),
    (answer_json(400, {"detail": {"error": "validation_error", "type": "invalid_request_error",
                                  "message": "Voice 'zz' not found. Available voices: af_heart"}}),
     400, "Voice 'zz' not found"),
    (answer_json(422, {"detail": [{"type": "less_than_equal", "loc": ["body", "speed"],
                                   "msg": "Input should be less than or equal to 4", "input": 9}]}),
     422, "body.speed: Input should be less than or equal to 4"),
    (answer_json(400, {"error": {"message": "Invalid value: 'zz'.", "type": "invalid_request_error",
                                 "param": "voice", "code": "invalid_value"}}),
     400, "Invalid value: 'zz'. (invalid_value)"),
    (lambda r, n: httpx.Response(502, text="<html><body><h1>502 Bad Gateway</h1></body></html>"),
     502, "502 Bad Gateway"),
])
async def test_http_errors_carry_the_status_and_the_servers_message(answer, status: int, expected: str) -> None:
    server = Server(answer)
    error = await fail(server.kokoros(max_retries=0), ProviderHTTPError)
    assert error.status == status
    assert expected in error.message


@pytest.mark.parametrize("status, body", [
    (400, {"error": {"message": "string too long", "type": "invalid_request_error",
                     "param": "input", "code": "string_above_max_length"}}),
    (413, {"detail": "Request Entity Too Large"}),
    (422, {"detail": [{"type": "string_type", "loc": ["body", "input"], "msg": "Input should be a valid string"}]}),
])
async def test_a_request_the_server_refuses_is_the_texts_fault_not_the_providers(status: int, body: object,
                                                                                autojump_clock) -> None:
    server = Server(answer_json(status, body))
    error = await fail(server.openai(max_retries=3), InputRefused)
    assert isinstance(error, ProviderHTTPError) and error.status == status
    assert error.provider_fault is False and not error.retryable
    assert len(server.requests) == 1


@pytest.mark.parametrize("status", [401, 403, 404, 500, 502, 503])
async def test_other_error_statuses_stay_the_providers_fault(status: int, autojump_clock) -> None:
    server = Server(lambda request, n: httpx.Response(status))
    error = await fail(server.kokoros(max_retries=0), ProviderHTTPError)
    assert error.provider_fault is True and not isinstance(error, InputRefused)


async def test_kokoros_empty_500_points_at_its_log() -> None:
    server = Server(lambda request, n: httpx.Response(500))
    error = await fail(server.kokoros(max_retries=0), ProviderHTTPError)
    assert "its log" in error.message and error.retryable


async def test_a_wrong_path_says_the_url_may_not_be_a_speech_server() -> None:
    server = Server(answer_json(404, {"detail": "Not Found"}))
    error = await fail(server.kokoros(), ProviderHTTPError)
    assert KOKOROS in error.message and "SPEECHCAST_KOKOROS_URL" in error.message


# -- retries ----------------------------------------------------------------------------


async def test_a_5xx_is_retried_max_retries_times_with_growing_jittered_backoff(autojump_clock) -> None:
    server = Server(lambda request, n: httpx.Response(503))
    error = await fail(server.kokoros(max_retries=2), ProviderHTTPError)
    assert error.status == 503
    assert len(server.requests) == 3
    # 0.25–0.5 s, then 0.5–1 s.
    assert 0.75 <= trio.current_time() <= 1.5


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_a_4xx_is_not_retried(status: int, autojump_clock) -> None:
    server = Server(lambda request, n: httpx.Response(status))
    await fail(server.openai(max_retries=3), ProviderHTTPError)
    assert len(server.requests) == 1
    assert trio.current_time() == 0


@pytest.mark.parametrize("status", [408, 429])
async def test_408_and_429_are_retried_until_audio_comes(status: int, autojump_clock) -> None:
    server = Server(lambda request, n: httpx.Response(status) if n < 3 else audio(PCM))
    assert b"".join(await collect(server.openai(max_retries=2))) == PCM
    assert len(server.requests) == 3


@pytest.mark.parametrize("retry_after, cap, waited", [("3", 10.0, 3.0), ("100", 10.0, 10.0), ("0", 10.0, 0.0)])
async def test_retry_after_is_honoured_up_to_the_cap(retry_after: str, cap: float, waited: float,
                                                     autojump_clock) -> None:
    server = Server(lambda request, n: httpx.Response(429, headers={"retry-after": retry_after}) if n == 1
                    else audio(PCM))
    assert b"".join(await collect(server.openai(retry_after_cap=cap))) == PCM
    assert trio.current_time() == waited


async def test_a_break_off_before_any_audio_is_retried(autojump_clock) -> None:
    def answer(request: httpx.Request, n: int) -> httpx.Response:
        if n == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return audio(PCM)

    server = Server(answer)
    assert b"".join(await collect(server.kokoros())) == PCM
    assert len(server.requests) == 2


async def test_a_break_off_after_audio_is_a_failure_and_not_retried() -> None:
    broken = httpx.RemoteProtocolError("peer closed connection without sending complete message body")
    server = Server(lambda request, n: audio(PCM[:101], broken))
    received: list[bytes] = []
    with pytest.raises(ProviderFailed) as caught:
        async with aclosing(server.kokoros().synthesize("Hi.", None, None)) as stream:
            async for piece in stream:
                received.append(piece)
    assert received == [PCM[:101]]
    assert "broke off after 101 bytes" in caught.value.message
    assert len(server.requests) == 1


# -- connection trouble and timeouts ----------------------------------------------------


def refuse(request: httpx.Request, n: int) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused")


async def test_a_refused_connection_is_unavailable_says_what_to_do_and_is_not_retried() -> None:
    server = Server(refuse)
    error = await fail(server.kokoros(), ProviderUnavailable)
    assert KOKOROS in error.message
    assert "koko openai" in error.message and "SPEECHCAST_KOKOROS_URL" in error.message
    assert len(server.requests) == 1


async def test_a_connect_timeout_is_a_timeout_and_retried(autojump_clock) -> None:
    def answer(request: httpx.Request, n: int) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out")

    server = Server(answer)
    error = await fail(server.kokoros(max_retries=1), ProviderTimeout)
    assert "could not connect" in error.message and KOKOROS in error.message
    assert len(server.requests) == 2


async def test_no_answer_at_all_is_a_first_byte_timeout(autojump_clock) -> None:
    async def answer(request: httpx.Request, n: int) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError

    server = Server(answer)
    error = await fail(server.kokoros(max_retries=0, first_byte_timeout=4.0), ProviderTimeout)
    assert "first_byte_timeout" in error.message
    assert trio.current_time() == 4.0


async def test_headers_without_audio_is_a_first_byte_timeout_from_the_request_start(autojump_clock) -> None:
    async def answer(request: httpx.Request, n: int) -> httpx.Response:
        await trio.sleep(1.5)
        return audio(None)

    server = Server(answer)
    await fail(server.kokoros(max_retries=0, first_byte_timeout=4.0), ProviderTimeout)
    assert trio.current_time() == 4.0


async def test_a_stream_that_stops_is_a_stall_timeout_after_the_audio_so_far(autojump_clock) -> None:
    server = Server(lambda request, n: audio(PCM[:10], None))
    received: list[bytes] = []
    with pytest.raises(ProviderTimeout) as caught:
        async with aclosing(server.kokoros(stall_timeout=2.0).synthesize("Hi.", None, None)) as stream:
            async for piece in stream:
                received.append(piece)
    assert received == [PCM[:10]]
    assert "stall_timeout" in caught.value.message
    assert trio.current_time() == 2.0
    assert len(server.requests) == 1


# -- cancellation and the limit on requests in flight ------------------------------------


async def test_cancelling_the_caller_closes_the_response_and_frees_the_slot(autojump_clock) -> None:
    bodies: list[Body] = []

    def answer(request: httpx.Request, n: int) -> httpx.Response:
        bodies.append(Body([PCM[:10], None]) if n == 1 else Body([PCM]))
        return httpx.Response(200, stream=bodies[-1])

    server = Server(answer)
    provider = server.kokoros(http_parallel=1, stall_timeout=1000.0)
    with trio.move_on_after(5):
        await collect(provider)
    assert bodies[0].closed
    with trio.fail_after(1):  # the one slot is free again
        assert b"".join(await collect(provider)) == PCM


async def test_stopping_early_closes_the_response() -> None:
    body = Body([PCM[:10], PCM[10:]])
    server = Server(lambda request, n: httpx.Response(200, stream=body))
    async with aclosing(server.kokoros().synthesize("Hi.", None, None)) as stream:
        async for _ in stream:
            break
    assert body.closed


async def test_no_more_than_http_parallel_requests_are_in_flight() -> None:
    release = trio.Event()
    active = peak = 0

    async def answer(request: httpx.Request, n: int) -> httpx.Response:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await release.wait()
        active -= 1
        return audio(PCM)

    server = Server(answer)
    provider = server.kokoros(http_parallel=2)
    results: list[bytes] = []

    async def speak() -> None:
        results.append(b"".join(await collect(provider)))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(speak)
            await trio.testing.wait_all_tasks_blocked()
            assert active == 2
            release.set()
    assert peak == 2 and results == [PCM] * 3


# -- the key, configuration, check() ----------------------------------------------------


async def test_the_api_key_appears_in_no_message_repr_or_log(autojump_clock) -> None:
    echo = {"error": {"message": f"Incorrect API key provided: {KEY}.", "type": "invalid_request_error",
                      "param": None, "code": "invalid_api_key"}}
    server = Server(lambda request, n: httpx.Response(503, json=echo) if n == 1 else httpx.Response(401, json=echo))
    provider = server.openai()
    with structlog.testing.capture_logs() as logs:
        error = await fail(provider, ProviderHTTPError)
    assert "rejected" in error.message and "OPENAI_API_KEY" in error.message
    assert logs and KEY not in repr(logs)
    for text in (error.message, str(error), repr(error), repr(provider), repr(server.requests[0].headers)):
        assert KEY not in text
    with pytest.raises(ProviderUnavailable) as caught:
        await provider.check()
    assert "the API key was rejected" in caught.value.message
    assert KEY not in str(caught.value)


async def test_openai_without_a_key_is_unavailable_before_any_request() -> None:
    server = Server(pcm_answer)
    provider = server.openai(openai_api_key=None)
    reason = provider.unavailable_reason()
    assert reason is not None and reason.startswith("OPENAI_API_KEY is not set")
    assert (await fail(provider, ProviderUnavailable)).message == reason
    with pytest.raises(ProviderUnavailable):
        await provider.check()
    assert server.requests == []
    assert server.kokoros().unavailable_reason() is None


async def test_providers_describe_themselves() -> None:
    kokoros, openai = Server(pcm_answer).kokoros(), Server(pcm_answer).openai()
    assert (kokoros.name, kokoros.sample_rate, kokoros.default_voice, kokoros.max_parallel) == (
        TTSProvider.KOKOROS, 24000, "af_heart", 2)
    assert (openai.name, openai.default_voice) == (TTSProvider.OPENAI, "alloy")


@pytest.mark.parametrize("status", [200, 404, 405])
async def test_check_accepts_any_answer_below_500_from_kokoros(status: int) -> None:
    server = Server(lambda request, n: httpx.Response(status, text="OK"))
    await server.kokoros().check()
    assert [(r.method, str(r.url)) for r in server.requests] == [("GET", f"{KOKOROS}/")]


async def test_check_of_openai_lists_models_with_the_key() -> None:
    server = Server(answer_json(200, {"object": "list", "data": []}))
    await server.openai().check()
    (request,) = server.requests
    assert str(request.url) == f"{OPENAI}/v1/models" and request.headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("answer, expected", [
    (refuse, "koko openai"),
    (lambda request, n: httpx.Response(500), "HTTP 500"),
])
async def test_check_says_why_kokoros_cannot_be_used(answer, expected: str) -> None:
    with pytest.raises(ProviderUnavailable) as caught:
        await Server(answer).kokoros().check()
    assert expected in caught.value.message and KOKOROS in caught.value.message


async def test_check_gives_up_on_a_server_that_does_not_answer(autojump_clock) -> None:
    async def answer(request: httpx.Request, n: int) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError

    with pytest.raises(ProviderUnavailable) as caught:
        await Server(answer).kokoros(connect_timeout=1.0, first_byte_timeout=4.0).check()
    assert "did not answer within 5 s" in caught.value.message


async def test_open_is_idempotent_and_the_provider_reopens_after_aclose() -> None:
    server = Server(pcm_answer)
    provider = server.kokoros()
    await provider.open()
    await provider.open()
    await provider.aclose()
    await provider.aclose()
    assert b"".join(await collect(provider)) == PCM
    await provider.aclose()


# -- the circuit breaker ----------------------------------------------------------------


async def test_breaker_opens_after_failures_in_a_row_and_probes_after_the_cooldown(autojump_clock) -> None:
    breaker = CircuitBreaker(failures=3, cooldown=30.0)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # not in a row any more
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.allow() and breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    assert not breaker.allow() and breaker.state is BreakerState.OPEN
    await trio.sleep(29.9)
    assert not breaker.allow()
    await trio.sleep(0.1)
    assert breaker.allow() and breaker.needs_probe


async def test_breaker_failed_probe_reopens_and_a_success_closes(autojump_clock) -> None:
    breaker = CircuitBreaker(failures=1, cooldown=10.0)
    breaker.record_failure()
    await trio.sleep(10)
    assert breaker.needs_probe
    breaker.record_failure()
    assert not breaker.allow() and not breaker.needs_probe
    await trio.sleep(10)
    breaker.record_success()
    assert breaker.allow() and not breaker.needs_probe and breaker.state is BreakerState.CLOSED
