"""The chunker's side of word and viseme times: items wait here until the chunk in which
they begin goes out, and become the `words` / `visemes` events sent just before it; what
was never sent (a cancel, audio cut short) is dropped with the utterance.
"""

from __future__ import annotations

from collections import deque
from itertools import groupby
from typing import TypeVar

from pipeline.events import VisemeTime, Visemes, Words, WordTime
from pipeline.timing import TimedViseme, TimedWord, Timing


class HeldTiming:
    """One utterance's items not yet sent, in order (start times never go back)."""

    def __init__(self, utterance_id: str, sample_rate: int) -> None:
        self.utterance_id = utterance_id
        self.rate = sample_rate
        self.words: deque[TimedWord] = deque()
        self.visemes: deque[TimedViseme] = deque()

    def add(self, timing: Timing) -> None:
        self.words.extend(timing.words)
        self.visemes.extend(timing.visemes)

    def due(self, chunk_end: int) -> list[Words | Visemes]:
        """The events for the items beginning before sample `chunk_end` (the end of the
        chunk about to go out): one event per kind and per `estimated` value."""
        words = _take(self.words, chunk_end)
        visemes = _take(self.visemes, chunk_end)
        events: list[Words | Visemes] = []
        for estimated, group in groupby(words, key=lambda w: w.estimated):
            items = tuple(WordTime(w.word, self._ms(w.start), self._ms(w.end), w.offset) for w in group)
            events.append(Words(self.utterance_id, items, estimated))
        for estimated, shapes in groupby(visemes, key=lambda v: v.estimated):
            spans = tuple(VisemeTime(v.viseme, self._ms(v.start), self._ms(v.end)) for v in shapes)
            events.append(Visemes(self.utterance_id, spans, estimated))
        return events

    def _ms(self, samples: int) -> int:
        return round(samples * 1000 / self.rate)


_Item = TypeVar("_Item", TimedWord, TimedViseme)


def _take(items: deque[_Item], before: int) -> list[_Item]:
    out = []
    while items and items[0].start < before:
        out.append(items.popleft())
    return out
