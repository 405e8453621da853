"""The provider faults of the soak run: one table of ways the fake Kokoros server
(tests/fakes/tts_servers.py, served by the soak process) can misbehave, switched at random
while the daemon speaks. Add a fault by adding a row; `apply` sets the fake's attributes
(which the fake reads afresh on every request).

What the daemon should do with each is DESIGN section 5: fail the piece, fall back to the
embedded voice (`fallback` = ["piper"]), report `error` with `recovered: true`, and end the
utterance with an honest status; none of it may cost a healthy subscriber a frame.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio

from tests.fakes.tts_servers import FakeKokoros, tone

# Audio the fake answers with: long enough to make several chunks, cut into HTTP chunks at
# odd offsets so a sample is split across two of them (as real servers do).
FAKE_PCM = tone(900, 330.0)
FAKE_SPLITS = (1, 3, 4801, 9999, 20001)
# Always fail: `fail_first` counts requests since the fake started.
ALWAYS = 10**9


@dataclass(frozen=True)
class FaultMode:
    """One way the fake behaves until the next switch."""

    name: str
    weight: int  # relative chance of being picked
    apply: Callable[[FakeKokoros], None]


def _healthy(fake: FakeKokoros) -> None:
    fake.fail_first, fake.break_after, fake.stall_after, fake.voices = 0, None, None, None


def _server_error(fake: FakeKokoros) -> None:
    _healthy(fake)
    fake.fail_first = ALWAYS  # every request: HTTP 500, empty body (Kokoros's only error)


def _break_off(fake: FakeKokoros) -> None:
    _healthy(fake)
    fake.break_after = len(FAKE_PCM) // 3  # the connection drops a third of the way in


def _unknown_voice(fake: FakeKokoros) -> None:
    _healthy(fake)
    fake.voices = {"no_such_voice"}  # Kokoros in stream mode: 200 with no bytes at all


def _stall_midway(fake: FakeKokoros) -> None:
    _healthy(fake)
    fake.stall_after = len(FAKE_PCM) // 2  # headers and half the audio, then silence


def _stall_before_audio(fake: FakeKokoros) -> None:
    _healthy(fake)
    fake.stall_after = 0  # headers out, not one byte of body


FAULT_MODES: tuple[FaultMode, ...] = (
    FaultMode("healthy", 6, _healthy),
    FaultMode("http_500", 2, _server_error),
    FaultMode("break_off", 2, _break_off),
    FaultMode("unknown_voice", 1, _unknown_voice),
    FaultMode("stall_midway", 1, _stall_midway),
    FaultMode("stall_before_audio", 1, _stall_before_audio),
)
HEALTHY = FAULT_MODES[0]


def new_fake() -> FakeKokoros:
    return FakeKokoros(pcm=FAKE_PCM, splits=FAKE_SPLITS)


def switch(fake: FakeKokoros, mode: FaultMode) -> None:
    """Put the fake in `mode`: let stalled bodies go (the daemon has given up on them by
    now, or they finish), forget old requests (bounded memory), then apply the mode."""
    fake.release.set()
    fake.release = trio.Event()
    del fake.requests[:]
    mode.apply(fake)
