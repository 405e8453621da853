"""Speaking one utterance: pipelined synthesis keeps audio in order (MockClock)."""

from __future__ import annotations

import dataclasses

import pytest
import trio
import trio.testing

from pipeline.commands import TTSProvider
from pipeline.config import Settings
from pipeline.errors import ProviderFailed
from pipeline.flow import Audio, Broadcast, UtteranceBegin
from pipeline.speaking import Speaker, Utterance
from tests.support import ScriptedProvider, provider_set, tone

TEXT = "The first sentence is here. The second sentence comes next. The third one ends it."


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


class SlowFirstPiece(ScriptedProvider):
    """Piece 1 is slow to finish (its second half comes 5 s later); the others are fast.
    Remembers when each piece started and finished."""

    def __init__(self) -> None:
        super().__init__(sample_rate=24000)
        self.log: list[tuple[str, str, float]] = []

    async def synthesize(self, text, voice, speed):
        self.log.append(("start", text, trio.current_time()))
        marker = 1000 * (1 + TEXT.index(text) // 25)  # distinct audio per piece
        yield tone(480, value=marker)
        if text.startswith("The first"):
            await trio.sleep(5)
            yield tone(480, value=marker + 500)
        self.log.append(("end", text, trio.current_time()))


async def speak(speaker: Speaker, text: str = TEXT) -> tuple[str, list]:
    out: list = []

    async def emit(item):
        out.append(item)

    utt = Utterance("u1", text, None, None, None, owner=1, received_at=0.0)
    with trio.fail_after(60):
        status = await speaker.speak(utt, TTSProvider.PIPER, emit)
    return status, out


def make_speaker(provider, **changes) -> Speaker:
    settings = dataclasses.replace(Settings(fallback=()), **changes)
    return Speaker(
        provider_set(settings, provider),
        sample_rate=24000,
        fallback=settings.fallback,
        lookahead=settings.lookahead,
        short_first_piece=False,
    )


async def test_the_next_piece_is_synthesized_while_the_current_one_streams_and_order_holds(autojump_clock):
    provider = SlowFirstPiece()
    status, out = await speak(make_speaker(provider, lookahead=1))
    assert status == "ok"
    pcm = b"".join(o.pcm for o in out if isinstance(o, Audio))
    marks = [1000 * (1 + TEXT.index(p) // 25) for p in ("The first", "The second", "The third")]
    assert pcm == tone(480, marks[0]) + tone(480, marks[0] + 500) + tone(480, marks[1]) + tone(480, marks[2])
    starts = {text[:9]: t for kind, text, t in provider.log if kind == "start"}
    ends = {text[:9]: t for kind, text, t in provider.log if kind == "end"}
    # Piece 2 was under way (and done) long before piece 1 finished: pipelined, yet in order.
    assert starts["The secon"] < ends["The first"] and ends["The secon"] < ends["The first"]


async def test_without_lookahead_pieces_run_one_after_another(autojump_clock):
    provider = SlowFirstPiece()
    status, _ = await speak(make_speaker(provider, lookahead=0))
    starts = {text[:9]: t for kind, text, t in provider.log if kind == "start"}
    ends = {text[:9]: t for kind, text, t in provider.log if kind == "end"}
    assert status == "ok" and starts["The secon"] >= ends["The first"]


async def test_utterance_begin_comes_just_before_the_first_audio(autojump_clock):
    status, out = await speak(make_speaker(ScriptedProvider()))
    assert isinstance(out[0], UtteranceBegin) and isinstance(out[1], Audio)


async def test_a_piece_that_breaks_midway_is_not_repeated_and_the_status_is_partial(autojump_clock):
    def script(text):
        return [tone(480), ProviderFailed("connection dropped")] if text.startswith("The second") else [tone(480)]

    kokoros = ScriptedProvider(TTSProvider.KOKOROS, script=script)
    piper = ScriptedProvider(TTSProvider.PIPER)
    settings = Settings(fallback=("piper",))
    speaker = Speaker(provider_set(settings, kokoros, piper), sample_rate=24000, fallback=("piper",), lookahead=1, short_first_piece=False)
    out: list = []

    async def emit(item):
        out.append(item)

    utt = Utterance("u1", TEXT, None, None, TTSProvider.KOKOROS, owner=1, received_at=0.0)
    status = await speaker.speak(utt, TTSProvider.KOKOROS, emit)
    assert status == "partial"
    assert piper.texts == ["The third one ends it."]  # the broken piece is not spoken again
    errors = [o.event for o in out if isinstance(o, Broadcast)]
    assert errors[0].code == "provider_failed" and errors[0].recovered is True
