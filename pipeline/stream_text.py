"""Incremental segmentation: text that keeps growing (an assistant's reply, token by token)
cut into the same pieces `pipeline.text.split_pieces` gives the whole text.

The router feeds a streaming utterance's appends to one `StreamSegmenter` and speaks each
piece as soon as `append` releases it; `flush` (a `flush: true` append, an idle flush,
`text_end`) releases the tail as it is.

How it decides (docs/streaming.md says the same for operators):
- It runs the whole-text pipeline of `pipeline.text` (pysbd windows, short-sentence merging,
  the short-first-piece rule, long-sentence and unbreakable-run cuts) on the held text, but
  feeds it only the sentence spans that can no longer change, and stops it with an exception
  when it asks for more. Every stage of that pipeline is a generator that yields a piece
  before pulling the next sentence, so whatever came out before the stop is final.
- pysbd's windows are replayed exactly: a window that whole text would close (more than a
  window of text after its start, and a word start after it) is closed here the same way, so
  forced cuts inside sentences longer than a window land where they land for whole text.
  In the last, open window a sentence boundary is trusted once `LOOKAHEAD_WORDS` complete
  words follow it (pysbd looks only that far: "Dr. Smith", "U.S. He", "3.14", "e.g. Apples").
  Boundaries past the window's first half wait for the window to close when the window has
  no earlier boundary, because whole text would then force a cut in that half.
- A sentence is released when the next span is known not to be short (its words so far
  already make it long enough, so no short-sentence merge can reach back), or when the next
  span is complete and the merge has decided.
- Short-first: the first piece is released as soon as the first sentence surely has 13
  words (then the cut, which looks only at its first 11 words, cannot move); a first
  sentence of 9 to 12 words waits for its end.

The property (tests/test_stream_text.py): for any text and any split of it into appends,
the pieces released by the appends and one final `flush` are exactly
`split_pieces(text, short_first=..., max_chars=...)`, so their concatenation is the text
itself, character for character. A `flush` in between forces a cut: the pieces are then
those of the text before the flush followed by those of the text after it, the latter
segmented with `short_first=False` once a piece has been released (the quick first piece
is for the utterance's first audio only). The one loss: text that is only whitespace when
`flush` is called is dropped, as `split_pieces` gives no piece for it; so "the spoken text
equals the text sent" holds modulo whitespace at piece boundaries (a consumer that strips
pieces, as `pipeline.speaking` does, sees exactly the words sent, in order, none split).

Cost: an append that adds no whitespace does nothing but store the text (no new word can
be complete); nor does one whose held text has no character a sentence may end after (no
boundary, so nothing to decide: a regex scan instead of pysbd); any other append
re-segments only the held text (from the start of the
oldest unreleased sentence or of pysbd's open window, whichever is earlier: at most about
two windows of text, plus a sentence longer than that). Released text is dropped and never
segmented again. One case is not bounded: a single unbreakable run (no whitespace at all)
is held whole, as whole-text segmentation cuts it only once its end is known.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator

import pysbd

from pipeline.text import (
    FIRST_MAX_WORDS,
    FIRST_MIN_WORDS,
    MIN_WORDS,
    _first_cut,
    _is_short,
    _merge_short,
    _Sentence,
    _window_cuts,
    _window_stop,
    pieces_of_sentences,
    window_size,
)

# Complete words that must follow a sentence boundary before it is trusted: pysbd decides
# "Dr. Smith", "U.S. He", "e.g. Apples" from the next word; one more is a safety margin.
LOOKAHEAD_WORDS = 2
# Words the first sentence needs before its quick first piece is final: the cut looks at
# words up to FIRST_MAX_WORDS and keeps MIN_WORDS after it, so 13 words fix it.
_EARLY_FIRST_WORDS = FIRST_MAX_WORDS + MIN_WORDS

# A character that may end a sentence, as far as the held text is concerned: anything but
# letters, digits, blanks, commas, apostrophes and hyphens (deliberately wide: pysbd ends
# sentences after . ! ? … 。 and friends, and a newline is counted too).
_MAY_END = re.compile(r"[^\w \t,'’-]")
_COMPLETE_WORD = re.compile(r"\S+(?=\s)")
_WORD = re.compile(r"\S+")
_WORD_START = re.compile(r"(?<=\s)\S")


class _NeedMore(Exception):
    """Raised into the whole-text pipeline where it asks for a sentence not yet known."""


class StreamSegmenter:
    """The pieces of one streaming utterance, released as soon as they are final.

    Not thread-safe; one per stream (it owns a pysbd Segmenter, which keeps its text).

    Error handling: `max_chars` below 1 raises `ValueError` at construction.
    """

    def __init__(self, *, short_first: bool = True, max_chars: int = 250) -> None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be at least 1, not {max_chars}")
        self._short_first = short_first
        self._max_chars = max_chars
        self._window = window_size(max_chars)
        self._segmenter = pysbd.Segmenter(language="en", clean=False, char_span=True)
        self._at_start = True  # the first sentence is not out yet: the first-piece rule applies
        self._clear()

    def _clear(self) -> None:
        # Offsets below are in `_buf`, which starts wherever the last trim left it.
        self._buf = ""
        self._pos = 0  # start of pysbd's open window (whole text would open it here too)
        self._closed: list[tuple[int, int]] = []  # spans of closed windows, from _restart on
        self._restart = 0  # start of the oldest sentence not wholly released
        self._done = 0  # end of the released text

    @property
    def held_chars(self) -> int:
        """Characters received but not released yet."""
        return len(self._buf) - self._done

    def append(self, text: str) -> list[str]:
        """Add `text`; return the pieces that are now final, in order (maybe none)."""
        if not text:
            return []
        could_open_word = self._buf[-1:].isspace() and len(self._buf) + len(text) - self._pos > self._window
        self._buf += text
        if not could_open_word and not any(c.isspace() for c in text):
            return []  # no word became complete, no window can close: nothing can change
        self._close_windows()
        if self._nothing_to_decide():
            return []
        return self._release(final=False)

    def flush(self) -> list[str]:
        """Release everything held, segmented as if the text ended here; nothing stays held."""
        released = [] if not self._buf[self._done :].strip() else self._release(final=True)
        self._clear()
        return released

    # --- internals ------------------------------------------------------------------

    def _nothing_to_decide(self) -> bool:
        """True when no piece can be released yet, known without running pysbd: the held
        text has no character a sentence may end after and no forced window cut, and the
        quick first piece is not pending (it counts words, not boundaries). Most appends
        of a sentence being written are like this; they then cost a regex scan."""
        if self._short_first and self._at_start and self._done == 0:
            return False
        if any(end > self._restart for _, end in self._closed):
            return False
        return _MAY_END.search(self._buf, self._restart) is None

    def _close_windows(self) -> None:
        """Close every pysbd window whole text would close, exactly as `_sentence_spans`."""
        buf, window = self._buf, self._window
        while len(buf) - self._pos > window:
            stop = _window_stop(buf, self._pos, window)
            if stop == len(buf):
                return  # no word start after the window yet: whole text would stop here too
            for cut in _window_cuts(self._segmenter, buf, self._pos, stop) or [stop]:
                self._closed.append((self._pos, cut))
                self._pos = cut

    def _spans(self, final: bool) -> tuple[list[tuple[int, int]], tuple[int, int] | None]:
        """Sentence spans from `_restart` that cannot change, and a probe span: the start of
        the next sentence, as far as no boundary can appear in it (None if unknown)."""
        buf = self._buf
        cuts = _window_cuts(self._segmenter, buf, self._pos, len(buf)) if len(buf) > self._pos else []
        horizon, limit = self._horizon() if not final else (len(buf), len(buf))
        if not final:
            if cuts and cuts[0] - self._pos > self._window // 2:
                cuts = []  # whole text may force a cut before it: wait for the window to close
            cuts = [cut for cut in cuts if cut <= horizon]
        spans = list(self._closed)
        edges = [self._pos, *cuts] + ([len(buf)] if final else [])
        spans += [(a, b) for a, b in itertools.pairwise(edges) if b > a]
        # Keep what is not released yet; a span straddling _restart only if a boundary moved.
        spans = [(max(a, self._restart), b) for a, b in spans if b > self._restart]
        probe = None
        last_end = spans[-1][1] if spans else self._restart
        # The merge asks of the next span only whether it is short and whether a short
        # sentence fits with it; a longer span answers both the same way as its start.
        if not final and limit > last_end:
            probe = (last_end, limit)
        return spans, probe

    def _release(self, *, final: bool) -> list[str]:
        buf = self._buf
        spans, probe = self._spans(final)

        def feed() -> Iterator[tuple[int, int]]:
            yield from spans
            if not final:
                if probe is not None:
                    yield probe
                raise _NeedMore

        ends: list[int] = []

        def record(sentences: Iterator[_Sentence]) -> Iterator[_Sentence]:
            for sentence in sentences:
                ends.append(sentence.end)
                yield sentence

        short_first = self._short_first and self._at_start
        sentences = record(_merge_short(buf, feed(), self._max_chars))
        pieces: list[str] = []
        try:
            pieces.extend(pieces_of_sentences(buf, sentences, short_first, self._max_chars))
        except _NeedMore:
            pass
        released = self._skip_released(pieces)
        if not final and short_first and self._done == 0 and not released:
            cut = self._early_first_cut(spans)
            if cut is not None:
                released = [buf[:cut]]
                self._done = cut
        if final and released:
            self._at_start = False
        if not final and ends and ends[-1] > self._restart:
            # A sentence is wholly out: the first-piece rule is done (an early first piece
            # alone does not end it: the rest of that sentence is still cut as whole text's).
            self._restart = ends[-1]
            self._at_start = False
            self._trim()
        return released

    def _skip_released(self, pieces: list[str]) -> list[str]:
        """The part of `pieces` (which start at `_restart`) after `_done`; moves `_done`."""
        out = []
        cursor = self._restart
        for piece in pieces:
            end = cursor + len(piece)
            if end > self._done:
                # A piece straddling _done would mean a boundary moved; keep the text whole.
                out.append(piece[max(0, self._done - cursor) :])
            cursor = end
        self._done = max(self._done, cursor)
        return out

    def _horizon(self) -> tuple[int, int]:
        """(horizon, limit): sentence boundaries at or before `horizon` are settled (enough
        complete words follow them); any boundary still to come is a word start after it,
        so at `limit` or later (the first word start after `horizon`, else the text's end)."""
        buf = self._buf
        words = [m.start() for m in _COMPLETE_WORD.finditer(buf, self._pos)]
        if len(words) < LOOKAHEAD_WORDS:
            return self._pos, self._pos
        horizon = words[-LOOKAHEAD_WORDS]
        following = _WORD_START.search(buf, horizon + 1)
        return horizon, following.start() if following else len(buf)

    def _early_first_cut(self, spans: list[tuple[int, int]]) -> int | None:
        """The quick first piece's end, once the first sentence is long enough to fix it.

        The first sentence reaches at least `limit` (no boundary can come before it). With
        13 words there, `_first_cut` looks only at words that are complete and the rules
        that depend on the sentence's end only widen with it, so checking that they are
        already met makes the cut final."""
        buf = self._buf
        horizon, limit = self._horizon()
        if spans:
            first_boundary = spans[0][1]
        else:
            tentative = _window_cuts(self._segmenter, buf, self._pos, len(buf)) if self._pos == 0 else [0]
            first_boundary = tentative[0] if tentative else len(buf)
        if first_boundary <= horizon or limit > self._window // 2:
            return None  # the sentence ends early, or whole text might force a cut in it
        first = _Sentence(0, limit)
        words = list(_WORD.finditer(buf, 0, limit))
        if len(words) < _EARLY_FIRST_WORDS:
            return None
        for k in range(FIRST_MIN_WORDS, FIRST_MAX_WORDS + 1):
            fits = words[k - 1].end() - words[0].start() <= self._max_chars
            if fits and _is_short(buf, words[k].start(), limit):
                return None  # whether this cut is allowed depends on text still to come
        return _first_cut(buf, first, self._max_chars)

    def _trim(self) -> None:
        """Drop released text no window or sentence needs any more."""
        cut = min(self._restart, self._pos)
        if cut <= 0:
            return
        self._buf = self._buf[cut:]
        self._pos -= cut
        self._restart -= cut
        self._done -= cut
        self._closed = [(a - cut, b - cut) for a, b in self._closed if b > self._restart + cut]
