"""Every way an HTTP speech server can misbehave, through the real daemon: what the
subscribers see (the `error`, the honest `utterance_finished`, bounded audio), and that
the next utterance is spoken and healthy subscribers stay connected.

The server is tests/fakes/faulty_server.py on loopback (so no MockClock: the bounds are
small instead, e.g. a 2 s piece deadline); the fallback is a scripted "piper", so what the
fallback speaks is known exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog
import trio
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from pipeline.audio import read_wav
from pipeline.commands import TTSProvider
from pipeline.config import Settings
from pipeline.daemon import running_daemon
from pipeline.events import ErrorEvent
from pipeline.flow import Audio, Broadcast, Speech
from pipeline.piece_bounds import PieceBounds
from pipeline.providers.openai_compat import kokoros_provider
from pipeline.speaking import Speaker, Utterance
from tests.fakes.faulty_server import FaultyServer
from tests.support import Heard, ScriptedProvider, finished, provider_set, receive_until, send, tone

LIMIT = 20  # seconds: each fault must be over well within this (old code: never, or 45 s)
FALLBACK_PCM = tone(2400)  # what the scripted "piper" says for any piece: 100 ms
TEXT = "A piece the server cannot speak."
NEXT = "The next one is spoken."


def settings_for(url: str, **changes: Any) -> Settings:
    base = dataclasses.replace(Settings(port=0, http_port=0), provider="kokoros")
    values: dict[str, Any] = dict(
        kokoros_url=url, fallback=("piper",), short_first_piece=False, lookahead=0,
        connect_timeout=2.0, first_byte_timeout=15.0, stall_timeout=5.0, max_retries=2,
        piece_timeout=2.0, piece_timeout_per_char=0.0, max_audio_base=1.0, max_audio_per_char=0.05)
    values.update(changes)
    return dataclasses.replace(base, **values)


@dataclass
class Seen:
    """What the sender and a second, healthy subscriber received."""

    sender: Heard = field(default_factory=Heard)
    listener: Heard = field(default_factory=Heard)
    listener_connected: bool = True
    listener_done: trio.Event = field(default_factory=trio.Event)

    def finished(self, utterance_id: str) -> dict[str, Any]:
        (event,) = [e for e in self.sender.of_type("utterance_finished") if e["utterance_id"] == utterance_id]
        return event

    def errors(self, utterance_id: str) -> list[dict[str, Any]]:
        return [e for e in self.sender.of_type("error") if e.get("utterance_id") == utterance_id]

    def pcm(self, utterance_id: str) -> bytes:
        """The audio of one utterance as the sender heard it (chunks up to its isFinal)."""
        started = {e["utterance_id"]: e["first_chunk_id"] for e in self.sender.of_type("utterance_started")}
        done = self.finished(utterance_id)
        if utterance_id not in started:
            return b""
        first, last = started[utterance_id], done["last_chunk_id"]
        return b"".join(read_wav(f.audio)[1] for f in self.sender.frames if first <= f.chunk_id <= last)


@asynccontextmanager
async def daemon_with(fake: FaultyServer, **changes: Any) -> AsyncIterator[tuple[int, FaultyServer]]:
    async with fake.running() as url:
        settings = settings_for(url, **changes)
        providers = provider_set(settings, kokoros_provider(settings),
                                 ScriptedProvider(TTSProvider.PIPER, script=lambda text: [FALLBACK_PCM]))
        async with running_daemon(settings, providers) as daemon:
            yield daemon.port, fake


async def speak_through_fault(fake: FaultyServer, text: str = TEXT, **changes: Any) -> Seen:
    """u1 (`text`) meets the fault; then the server heals and u2 (NEXT) must be spoken by it."""
    seen = Seen()
    with trio.fail_after(LIMIT):
        async with daemon_with(fake, **changes) as (port, _):
            async with open_websocket_url(f"ws://127.0.0.1:{port}/") as listener, \
                    open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(listen, listener, seen)
                    await send(ws, type="send_message", text=text)
                    await receive_until(ws, seen.sender, finished("u1"))
                    fake.fault = None
                    await send(ws, type="send_message", text=NEXT)
                    await receive_until(ws, seen.sender, finished("u2"))
                    await seen.listener_done.wait()  # the listener got everything too
                    nursery.cancel_scope.cancel()
    assert seen.listener_connected, "a healthy subscriber was dropped"
    assert [e["utterance_id"] for e in seen.listener.of_type("utterance_finished")] == ["u1", "u2"]
    u2 = seen.finished("u2")
    assert u2["status"] == "ok" and seen.errors("u2") == []
    assert [e["provider"] for e in seen.sender.of_type("utterance_started") if e["utterance_id"] == "u2"] == ["kokoros"]
    assert seen.pcm("u2") == fake.pcm
    return seen


async def listen(ws: WebSocketConnection, seen: Seen) -> None:
    try:
        await receive_until(ws, seen.listener, finished("u2"))
    except ConnectionClosed:
        seen.listener_connected = False
    seen.listener_done.set()


def assert_recovered_error(seen: Seen, *words: str) -> str:
    (error,) = seen.errors("u1")
    assert error["code"] == "provider_failed" and error["recovered"] is True
    for word in words:
        assert word in error["message"]
    return error["message"]


async def test_a_body_trickling_one_byte_at_a_time_ends_at_the_piece_deadline():
    seen = await speak_through_fault(FaultyServer(fault="trickle", trickle_interval=0.1))
    assert_recovered_error(seen, "piece_timeout", "within 2.0 s")
    # A few trickled samples went out before the deadline: the piece broke off midway.
    assert seen.finished("u1")["status"] == "partial"
    assert 0 < len(seen.pcm("u1")) < 100


async def test_an_endless_body_is_cut_off_at_the_audio_cap():
    seen = await speak_through_fault(FaultyServer(fault="endless"))
    assert_recovered_error(seen, "more audio than the text can hold")
    cap_seconds = 1.0 + 0.05 * len(TEXT)  # max_audio_base + max_audio_per_char x characters
    heard = len(seen.pcm("u1")) / 2 / 24000
    assert seen.finished("u1")["status"] == "partial"
    assert cap_seconds - 0.25 <= heard <= cap_seconds + 0.01


@pytest.mark.parametrize("rate", [1, 0, 10_000_000])
async def test_a_wav_header_with_a_lying_rate_is_refused_and_the_fallback_speaks(rate: int):
    seen = await speak_through_fault(FaultyServer(fault="lying_wav", wav_rate=rate))
    assert_recovered_error(seen, f"claiming {rate} Hz")
    # Refused before any audio: the fallback spoke the whole piece, so nothing is missing.
    assert seen.finished("u1")["status"] == "ok"
    assert seen.pcm("u1") == FALLBACK_PCM
    assert [e["provider"] for e in seen.sender.of_type("utterance_started")] == ["piper", "kokoros"]


async def test_a_200_html_page_is_refused_with_its_words_and_the_fallback_speaks():
    seen = await speak_through_fault(FaultyServer(fault="html"))
    assert_recovered_error(seen, "text/html", "Please sign in to continue")
    assert seen.finished("u1")["status"] == "ok"
    assert seen.pcm("u1") == FALLBACK_PCM


async def test_a_json_error_sent_as_audio_pcm_is_not_played_as_noise():
    seen = await speak_through_fault(FaultyServer(fault="json_as_pcm"))
    assert_recovered_error(seen, "JSON (sent as audio/pcm)", "The engine is currently overloaded")
    assert seen.finished("u1")["status"] == "ok"
    assert seen.pcm("u1") == FALLBACK_PCM


async def test_a_server_that_never_sends_headers_is_given_up_at_the_piece_deadline():
    # first_byte_timeout 15 s x 3 attempts would hold the queue 45 s; the piece deadline is 2 s.
    fake = FaultyServer(fault="stall_headers")
    seen = await speak_through_fault(fake)
    assert_recovered_error(seen, "piece_timeout")
    assert seen.finished("u1")["status"] == "ok"
    assert seen.pcm("u1") == FALLBACK_PCM
    assert fake.disconnects >= 1  # the request was dropped, so the server can stop too


async def test_a_connection_closed_mid_sample_ends_partial_without_the_half_sample():
    fake = FaultyServer(fault="close_mid_sample")
    seen = await speak_through_fault(fake)
    assert_recovered_error(seen, "broke off")
    sent = len(fake.pcm) // 2 | 1  # an odd number of bytes
    assert seen.finished("u1")["status"] == "partial"
    assert seen.pcm("u1") == fake.pcm[:sent - 1]


async def test_a_body_ending_mid_sample_drops_the_half_sample_and_says_so():
    fake = FaultyServer(fault="odd_end")
    with structlog.testing.capture_logs() as logs:
        seen = await speak_through_fault(fake)
    sent = len(fake.pcm) // 2 | 1
    assert seen.errors("u1") == [] and seen.finished("u1")["status"] == "ok"
    assert seen.pcm("u1") == fake.pcm[:sent - 1]
    assert [e["bytes"] for e in logs if e["event"] == "provider.half_sample"] == [1]


# -- the same bounds hold for any provider, not only HTTP ones (MockClock, no network) ----


async def speak_on(provider: ScriptedProvider, bounds: PieceBounds, text: str, speed: float | None = None
                   ) -> tuple[str, list[Speech]]:
    fallback = ScriptedProvider(TTSProvider.KOKOROS, script=lambda piece: [FALLBACK_PCM])
    settings = Settings(fallback=("kokoros",))
    speaker = Speaker(provider_set(settings, provider, fallback), sample_rate=24000, fallback=("kokoros",),
                      lookahead=1, short_first_piece=False, bounds=bounds)
    out: list[Speech] = []

    async def emit(item: Speech) -> None:
        out.append(item)

    utt = Utterance("u1", text, None, speed, None, owner=1, received_at=0.0)
    with trio.fail_after(600):
        status = await speaker.speak(utt, TTSProvider.PIPER, emit)
    return status, out


def errors_in(out: list[Speech]) -> list[ErrorEvent]:
    return [item.event for item in out if isinstance(item, Broadcast) and isinstance(item.event, ErrorEvent)]


async def test_any_provider_slower_than_the_piece_deadline_is_given_up(autojump_clock):
    slow = ScriptedProvider(TTSProvider.PIPER, script=lambda text: [tone(2400)] * 100, seconds=1.0)
    bounds = PieceBounds(timeout=10.0, timeout_per_char=0.5, audio_base=1000.0, audio_per_char=0.0)
    text = "Twenty characters!!!"
    status, out = await speak_on(slow, bounds, text, speed=0.5)
    # 10 s + 0.5 s x 20 characters x 1/0.5 = 30 s: 30 of the 100 items were heard.
    assert trio.current_time() == pytest.approx(30.0)
    (error,) = errors_in(out)
    assert "within 30.0 s" in error.message and error.recovered is True
    assert status == "partial"


@given(chars=st.integers(min_value=1, max_value=250), speed=st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0]),
       item=st.integers(min_value=1, max_value=4800))
@hyp_settings(deadline=None, max_examples=25)
def test_no_provider_can_send_more_audio_than_the_text_holds(chars: int, speed: float, item: int):
    # Up to 250 characters the text is one piece (longer runs are cut: pipeline/text.py).
    # Small bounds and items of at least 100 samples keep each example to a few thousand items.
    bounds = PieceBounds(audio_base=0.1, audio_per_char=0.01)
    endless = ScriptedProvider(TTSProvider.PIPER, script=lambda text: itertools.repeat(b"\x01\x02" * (99 + item)))
    status, out = trio.run(speak_on, endless, bounds, "x" * chars, speed)
    heard = sum(len(o.pcm) for o in out if isinstance(o, Audio))
    assert heard == bounds.audio_bytes("x" * chars, speed, 24000)
    (error,) = errors_in(out)
    assert "more audio than the text can hold" in error.message and status == "partial"
