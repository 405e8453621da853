"""The HTTP provider against real servers on loopback that behave like Kokoros,
Kokoro-FastAPI and OpenAI (tests/fakes/tts_servers.py).

Real sockets, so no MockClock: timeouts in Settings are short, every test runs under
`trio.fail_after`, and synchronisation uses the fakes' events, never sleeps.
"""

from __future__ import annotations

import itertools
from contextlib import aclosing

import pytest
import trio

from pipeline.config import Settings
from pipeline.errors import ProviderEmptyAudio, ProviderFailed, ProviderHTTPError, ProviderTimeout, ProviderUnavailable
from pipeline.providers.openai_compat import OpenAICompatProvider, kokoros_provider, openai_provider
from tests.fakes.tts_servers import FakeKokoroFastAPI, FakeKokoros, FakeOpenAI, tone

KEY = "sk-test-fake-key-0123456789"
LIMIT = 10  # seconds any test may take before it counts as hung


def make_settings(url: str, **changes: object) -> Settings:
    values: dict[str, object] = dict(
        kokoros_url=url, openai_url=url, openai_api_key=KEY, connect_timeout=2.0,
        first_byte_timeout=5.0, stall_timeout=5.0, max_retries=0, retry_after_cap=1.0)
    values.update(changes)
    return Settings(**values)  # type: ignore[arg-type]


async def collect(provider: OpenAICompatProvider, voice: str | None = None, into: list[bytes] | None = None) -> list[bytes]:
    pieces = into if into is not None else []
    async with aclosing(provider.synthesize("Hello there.", voice, None)) as stream:
        async for piece in stream:
            pieces.append(piece)
    return pieces


async def test_pcm_split_at_odd_offsets_arrives_bit_exact() -> None:
    pcm = tone(300)
    cuts = [1, 2, 5, 4801, 4802, 9999]
    fake = FakeKokoros(pcm=pcm, splits=cuts)
    with trio.fail_after(LIMIT):
        async with fake.running() as url:
            provider = kokoros_provider(make_settings(url))
            pieces = await collect(provider)
            await provider.aclose()
    assert b"".join(pieces) == pcm
    # Each HTTP chunk boundary is still a boundary: nothing waited to realign samples.
    assert set(cuts) <= set(itertools.accumulate(len(p) for p in pieces))
    (request,) = fake.speech_requests
    assert request.json == {"model": "kokoro", "input": "Hello there.", "voice": "af_heart",
                            "response_format": "pcm", "speed": 1.0, "stream": True}
    assert "authorization" not in request.headers


async def test_audio_is_yielded_while_the_server_is_still_sending() -> None:
    pcm = tone(100)
    fake = FakeKokoros(pcm=pcm, stall_after=1000)
    received: list[bytes] = []
    with trio.fail_after(LIMIT):
        async with fake.running() as url:
            provider = kokoros_provider(make_settings(url))
            async with aclosing(provider.synthesize("Hi.", None, None)) as stream:
                async for piece in stream:
                    received.append(piece)
                    if sum(map(len, received)) == 1000:
                        fake.release.set()  # the rest is sent only now
            await provider.aclose()
    assert b"".join(received) == pcm


async def test_kokoros_unknown_voice_empty_200_is_empty_audio() -> None:
    fake = FakeKokoros(voices={"af_heart"})
    with trio.fail_after(LIMIT):
        async with fake.running() as url:
            provider = kokoros_provider(make_settings(url, max_retries=2))
            with pytest.raises(ProviderEmptyAudio) as caught:
                await collect(provider, voice="zz_nobody")
            await provider.aclose()
    assert "zz_nobody" in caught.value.message
    assert len(fake.speech_requests) == 1


async def test_kokoros_bare_500_is_an_http_error_and_a_retry_can_succeed() -> None:
    pcm = tone(50)
    fake = FakeKokoros(pcm=pcm, fail_first=1)
    with trio.fail_after(LIMIT):
        async with fake.running() as url:
            provider = kokoros_provider(make_settings(url))
            with pytest.raises(ProviderHTTPError) as caught:
                await collect(provider)
            assert caught.value.status == 500 and "no details" in caught.value.message
            retrying = kokoros_provider(make_settings(url, max_retries=1))
            fake.fail_first = 2
            assert b"".join(await collect(retrying)) == pcm
            await provider.aclose()
            await retrying.aclose()
    assert len(fake.speech_requests) == 3


async def test_a_body_that_breaks_off_is_a_failure_after_the_audio_so_far() -> None:
    pcm = tone(100)
    fake = FakeKokoros(pcm=pcm, splits=[500], break_after=1001)
    received: list[bytes] = []
    with trio.fail_after(LIMIT):
        async with fake.running() as url:
            provider = kokoros_provider(make_settings(url, max_retries=2))
            with pytest.raises(ProviderFailed) as caught:
                await collect(provider, into=received)
            await provider.aclose()
    assert b"".join(received) == pcm[:1001]
    assert "broke off" in caught.value.message
    assert len(fake.speech_requests) == 1


async def test_a_stalled_body_times_out_and_the_connection_is_dropped() -> None:
    pcm = tone(100)
    fake = FakeKokoros(pcm=pcm, stall_after=1000)
    received: list[bytes] = []
    with trio.fail_after(LIMIT):
        async with fake.running() as url:
            provider = kokoros_provider(make_settings(url, stall_timeout=0.3))
            with pytest.raises(ProviderTimeout) as caught:
                await collect(provider, into=received)
            await fake.client_left.wait()
            await provider.aclose()
    assert "stall_timeout" in caught.value.message
    assert b"".join(received) == pcm[:1000]


async def test_headers_without_audio_is_a_first_byte_timeout() -> None:
    fake = FakeKokoros(stall_after=0)
    with trio.fail_after(LIMIT):
        async with fake.running() as url:
            provider = kokoros_provider(make_settings(url, first_byte_timeout=0.3))
            with pytest.raises(ProviderTimeout) as caught:
                await collect(provider)
            await provider.aclose()
    assert "first_byte_timeout" in caught.value.message


@pytest.mark.parametrize("how", ["cancel", "stop"])
async def test_leaving_early_aborts_the_request_on_the_server(how: str) -> None:
    fake = FakeKokoros(pcm=tone(100), stall_after=1000)
    with trio.fail_after(LIMIT):
        async with fake.running() as url:
            provider = kokoros_provider(make_settings(url))
            async with trio.open_nursery() as nursery:

                async def listen() -> None:
                    async with aclosing(provider.synthesize("Hi.", None, None)) as stream:
                        async for _ in stream:
                            if how == "stop":
                                break

                nursery.start_soon(listen)
                await fake.stalled.wait()
                if how == "cancel":  # the listener is waiting for more audio (stall_timeout is 5 s)
                    nursery.cancel_scope.cancel()
            await fake.client_left.wait()  # the server saw the client go
            await provider.aclose()
    assert fake.disconnects == 1


async def test_kokoro_fastapi_detail_messages_surface() -> None:
    fake = FakeKokoroFastAPI(voices={"af_heart", "af_bella"})
    with trio.fail_after(LIMIT):
        async with fake.running() as url:
            provider = kokoros_provider(make_settings(url))
            await provider.check()  # its GET / is a 404: still a server that answers
            with pytest.raises(ProviderHTTPError) as unknown_voice:
                await collect(provider, voice="zz")
            too_fast = OpenAICompatProvider(provider.name, base_url=url, model="kokoro", voice="af_heart", speed=9.0,
                                            api_key=None, settings=make_settings(url), check_path="/health")
            with pytest.raises(ProviderHTTPError) as invalid:
                await collect(too_fast)
            await too_fast.check()
            await provider.aclose()
            await too_fast.aclose()
    assert unknown_voice.value.status == 400
    assert "Voice 'zz' not found. Available voices: af_bella, af_heart" in unknown_voice.value.message
    assert invalid.value.status == 422 and "body.speed: Input should be less than or equal to 4" in invalid.value.message


async def test_openai_streams_with_the_key_and_retries_a_429_after_retry_after() -> None:
    pcm = tone(120)
    fake = FakeOpenAI(api_key=KEY, pcm=pcm, splits=[3, 7], fail_first=1, fail_status=429, retry_after=0)
    with trio.fail_after(LIMIT):
        async with fake.running() as url:
            provider = openai_provider(make_settings(url, max_retries=1))
            await provider.check()
            assert b"".join(await collect(provider)) == pcm
            await provider.aclose()
    assert len(fake.speech_requests) == 2
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in fake.speech_requests)
    assert "stream" not in fake.speech_requests[1].json


async def test_openai_rejects_a_wrong_key_without_showing_it() -> None:
    wrong = "sk-wrong-key-ABCDEFGHIJKLMNOP"
    fake = FakeOpenAI(api_key=KEY)
    with trio.fail_after(LIMIT):
        async with fake.running() as url:
            provider = openai_provider(make_settings(url, openai_api_key=wrong, max_retries=2))
            with pytest.raises(ProviderHTTPError) as refused:
                await collect(provider)
            with pytest.raises(ProviderUnavailable) as unchecked:
                await provider.check()
            await provider.aclose()
    assert refused.value.status == 401 and "rejected" in refused.value.message
    assert "the API key was rejected" in unchecked.value.message
    assert len(fake.speech_requests) == 1
    for text in (refused.value.message, unchecked.value.message, repr(provider)):
        assert wrong not in text and "MNOP" not in text


async def test_nothing_listening_is_unavailable_with_what_to_do() -> None:
    with trio.socket.socket() as probe:  # a port that was free a moment ago and is closed now
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    provider = kokoros_provider(make_settings(url, max_retries=2))
    with trio.fail_after(LIMIT):
        with pytest.raises(ProviderUnavailable) as unchecked:
            await provider.check()
        with pytest.raises(ProviderUnavailable) as unspoken:
            await collect(provider)
        await provider.aclose()
    for error in (unchecked.value, unspoken.value):
        assert url in error.message and "koko openai" in error.message
