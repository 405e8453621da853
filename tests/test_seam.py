"""The seam after the short first piece is inaudible: no click, and no pause longer than
the voice's own pause between clauses (real embedded voice, so real audio)."""

from __future__ import annotations

import numpy as np
import trio

from pipeline.commands import TTSProvider
from pipeline.config import Settings
from pipeline.flow import Audio
from pipeline.providers.piper import SILENCE_LEVEL
from pipeline.speaking import Speaker, Utterance
from tests.support import RecordingPiper, provider_set

RATE = 22050  # the voice's own rate: the seam sits exactly where the first piece ends
SENTENCE = "When the storm finally passed, the people of the little village came out of their houses to look at the damage."


async def speak(piper: RecordingPiper, *, short_first: bool) -> np.ndarray:
    settings = Settings(sample_rate=RATE)
    speaker = Speaker(provider_set(settings, piper), sample_rate=RATE, fallback=(), lookahead=1, short_first_piece=short_first)
    pcm = bytearray()

    async def emit(item):
        if isinstance(item, Audio):
            pcm.extend(item.pcm)

    utt = Utterance("u1", SENTENCE, None, None, None, owner=1, received_at=0.0)
    with trio.fail_after(30):
        assert await speaker.speak(utt, TTSProvider.PIPER, emit) == "ok"
    return np.frombuffer(bytes(pcm), dtype="<i2").astype(np.int32)


def silent_run_around(samples: np.ndarray, index: int) -> tuple[int, int]:
    """The run of near-silent samples that contains (or touches) `index`."""
    quiet = np.abs(samples) < SILENCE_LEVEL
    start = end = min(index, samples.size - 1)
    while start > 0 and quiet[start - 1]:
        start -= 1
    while end < samples.size and quiet[end]:
        end += 1
    return start, end


def longest_inner_pause(samples: np.ndarray) -> int:
    """The longest near-silent run strictly inside the speech (the voice's own pauses)."""
    loud = np.flatnonzero(np.abs(samples) >= SILENCE_LEVEL)
    inner = samples[loud[0] : loud[-1] + 1]
    quiet = np.abs(inner) < SILENCE_LEVEL
    longest = run = 0
    for q in quiet:
        run = run + 1 if q else 0
        longest = max(longest, run)
    return longest


async def test_the_seam_after_the_short_first_piece_has_no_click_and_no_long_pause():
    own_pauses = [longest_inner_pause(await speak(RecordingPiper(), short_first=False)) for _ in range(3)]

    piper = RecordingPiper()
    joined = await speak(piper, short_first=True)
    audio_of = dict(piper.pieces)
    assert list(audio_of) == [
        "When the storm finally passed,",
        "the people of the little village came out of their houses to look at the damage.",
    ]
    seam = len(audio_of["When the storm finally passed,"]) // 2
    start, end = silent_run_around(joined, seam)
    gap_ms = (end - start) / RATE * 1000
    assert gap_ms <= max(own_pauses) / RATE * 1000, f"seam pause {gap_ms:.0f} ms, voice's own {own_pauses}"
    # The join falls inside silence: no step, so no click.
    assert start < seam < end
    around = joined[seam - RATE // 500 : seam + RATE // 500]
    assert np.abs(np.diff(around)).max() < 2 * SILENCE_LEVEL
