"""Word and viseme times for the audio sent (DESIGN.md section 11), on the router's side.

A provider that knows its timings (the embedded voice, pipeline/providers/piper_align.py)
yields a `PieceTiming` before a piece's audio: word spans and visemes in its own samples,
from the piece's first sample. For a provider that does not, `Estimate` spreads the piece's
words over its audio in proportion to their characters, once that audio has all arrived. `Timeline`
places both on the utterance's clock (output samples from its first sample: seams between
pieces, resampling and failover included) and keeps words strictly ordered and visemes
contiguous. The chunker then sends each item just before the chunk in which it begins.

    provider ─PieceTiming─► speaking._Run ─Timing─► chunker ─TimingNotice─► broadcaster

What a word is (the same for every provider, so a failover changes no word list): a run
of non-space characters holding a letter, a digit or a spoken symbol (`SPOKEN_SYMBOLS`);
punctuation-only runs ("--", "…", "—") are not spoken and are no items. Quotes and brackets
around a word, and the clause punctuation after it, are not part of `word`. A number or
abbreviation the voice reads as several words ("$29.99", "e.g.") stays one item.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from dataclasses import dataclass
from typing import Final

from pipeline.visemes import letter_visemes

SPOKEN_SYMBOLS: Final = frozenset("&%$€£¥@#+=°§")
_TOKEN: Final = re.compile(r"\S+")
_LEADING: Final = "\"'([{¿¡“‘«„"
_TRAILING: Final = "\"')]}”’»,;:!?…"


def words_of(text: str) -> list[tuple[str, int]]:
    """The words of `text` (see the module docstring) with their offsets in code points."""
    out = []
    for match in _TOKEN.finditer(text):
        token, start = match.group(), match.start()
        if not any(_spoken(ch) for ch in token):
            continue
        lead = len(token) - len(token.lstrip(_LEADING))
        word = token[lead:].rstrip(_TRAILING)
        if word.endswith(".."):
            word = word.rstrip(".")  # an ellipsis
        elif word.endswith(".") and "." not in word[:-1]:
            word = word[:-1]  # a sentence's full stop; "e.g." and "U.S." keep theirs
        out.append((word or token, start + lead if word else start))
    return out


def _spoken(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "LN" or ch in SPOKEN_SYMBOLS


class OffsetFinder:
    """Where each piece of an utterance starts in its whole text: pieces are the text cut
    in order (stripped), so each is found after the previous one. Text may be added as
    it arrives (a streamed utterance); only the part not yet located is kept."""

    def __init__(self, text: str = "") -> None:
        self._rest = text
        self._base = 0  # code points before `_rest`

    def add(self, text: str) -> None:
        self._rest += text

    def locate(self, piece: str) -> int:
        """The offset of `piece`, the next piece; a piece not found (never expected) is
        placed where the search stands, so offsets stay in order."""
        at = self._rest.find(piece)
        if at < 0:
            return self._base
        offset = self._base + at
        self._base = offset + len(piece)
        self._rest = self._rest[at + len(piece) :]
        return offset


@dataclass(frozen=True)
class PieceTiming:
    """A provider's own timings for one piece, in its samples from the piece's first one:
    `words` as (index in `words_of(piece)`, start, end), `visemes` as (viseme, start, end),
    contiguous over the piece's audio."""

    words: tuple[tuple[int, int, int], ...]
    visemes: tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class TimedWord:
    word: str
    offset: int  # in the utterance's text, code points
    start: int  # output samples from the utterance's first sample
    end: int
    estimated: bool


@dataclass(frozen=True)
class TimedViseme:
    viseme: str
    start: int
    end: int
    estimated: bool


@dataclass(frozen=True)
class Timing:
    """Router → chunker: items on the utterance's clock, in order, each sent by the chunker
    just before the chunk in which it begins (never for audio not sent)."""

    utterance_id: str
    words: tuple[TimedWord, ...]
    visemes: tuple[TimedViseme, ...]


class Estimate:
    """Estimated times for one piece of a provider without timings: its words spread over
    its audio in proportion to their characters (the word and the space after it), each
    word's visemes spread evenly over it from its letters (pipeline.visemes).

    The words are placed once the piece's audio has all arrived (`place(total)`), so the
    spread is over its real duration; they reach subscribers just before the chunk after
    that audio, i.e. possibly after the chunk in which they begin, but ahead of playback
    whenever the voice is faster than real time (audio is sent as fast as it comes).
    Only placed words are sent, and only on audio that was sent: a piece cut off midway
    gives no words (its utterance ends `partial`)."""

    def __init__(self, words: list[tuple[str, int]]) -> None:
        self.words = words
        self.weights = [len(word) + 1 for word, _ in words]

    def place(self, total: int) -> PieceTiming:
        """The words spread over `total` samples in proportion to their weights."""
        placed: list[tuple[int, int, int]] = []
        whole, start = sum(self.weights), 0
        for k, upto in enumerate(itertools.accumulate(self.weights) if total > 0 else ()):
            end = round(total * upto / whole)
            placed.append((k, start, max(end, start + 1)))
            start = max(end, start + 1)
        return self._timing(placed)

    def _timing(self, placed: list[tuple[int, int, int]]) -> PieceTiming:
        visemes: list[tuple[str, int, int]] = []
        for index, start, end in placed:
            shapes = letter_visemes(self.words[index][0])
            for k, shape in enumerate(shapes):
                a = start + (end - start) * k // len(shapes)
                b = start + (end - start) * (k + 1) // len(shapes)
                if b > a:
                    visemes.append((shape, a, b))
        return PieceTiming(tuple(placed), tuple(visemes))


class TimedPCM(bytes):
    """A piece's first audio from a provider that knows its timings, carrying them (a
    bytes value, so whatever passes audio along passes this too)."""

    timing: PieceTiming | None = None


class Timeline:
    """One utterance's clock: places pieces' timings at their origin (output samples) and
    keeps the promises of DESIGN.md section 11 whatever rounding or a provider did:
    words in order without overlap, visemes contiguous (gaps become `sil`)."""

    def __init__(self, out_rate: int) -> None:
        self.out_rate = out_rate
        self.word_end = 0
        self.viseme_end = 0

    def place(
        self, utterance_id: str, words: list[tuple[str, int]], base: int, timing: PieceTiming,
        origin: float, in_rate: int, *, estimated: bool,
    ) -> Timing:
        """`timing` of a piece whose first sample is at `origin` on the utterance's clock,
        its words `words` (offsets in the piece) starting at `base` in the utterance's text."""
        scale = self.out_rate / in_rate

        def at(sample: int) -> int:
            return round(origin + sample * scale)

        timed_words = []
        for index, start, end in timing.words:
            word, offset = words[index]
            a = max(at(start), self.word_end)
            b = max(at(end), a + 1)
            self.word_end = b
            timed_words.append(TimedWord(word, base + offset, a, b, estimated))
        timed_visemes = []
        for shape, start, end in timing.visemes:
            a, b = at(start), at(end)
            if b <= self.viseme_end:
                continue
            if a > self.viseme_end:
                timed_visemes.append(TimedViseme("sil", self.viseme_end, a, estimated))
            # (one overlapping the previous starts where that one ended: contiguous)
            timed_visemes.append(TimedViseme(shape, max(a, self.viseme_end), b, estimated))
            self.viseme_end = b
        return Timing(utterance_id, tuple(timed_words), tuple(timed_visemes))

    def close(self, utterance_id: str, total: int, *, estimated: bool) -> Timing | None:
        """Silence from the last viseme to the end of the audio, if any is left."""
        if total <= self.viseme_end:
            return None
        item = TimedViseme("sil", self.viseme_end, total, estimated)
        self.viseme_end = total
        return Timing(utterance_id, (), (item,))

