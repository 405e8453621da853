"""Text segmentation: one utterance's text cut into the pieces the router synthesizes in turn.

Sentence boundaries come from pysbd (rule-based Golden-Rules segmenter, char spans), chosen
over sentence-stream after trying both on the hard cases: sentence-stream splits after
"e.g."/"i.e." before a capital and after "Prof."/"Capt.", keeps "U.S. He" together, and
returns stripped text with asterisks removed, so it cannot give the text back exactly.
pysbd handles those; its one miss, "?" inside a URL, is covered by cutting only where
whitespace precedes a word. pysbd's time grows faster than the text, so it runs on windows
of `2 * max_chars` characters and only as far as the consumer iterates (`iter_pieces`):
the first piece never waits for the rest of a long text.

Own rules on top of the sentences:
- Short sentences (fewer than 3 words or 12 characters: "Yes.", "OK.") join the next
  sentence, or the previous one when they are last or the next would make it too long.
- A sentence longer than `max_chars` is cut at clause boundaries (after , ; : ! ? … — –),
  as close to the middle as possible when two pieces will do, else as late as possible;
  only when no clause boundary fits is it cut between words (preferably before a
  conjunction, and not just after an article, a preposition or an abbreviation if avoidable).
- `short_first`: a first sentence of more than 8 words gives up its first clause as the first
  piece, the clause ending after 4 to 10 words. Without such a clause the cut goes before the
  earliest conjunction ("and", "but", "which", "that", "because", ...) in that range, else
  before the earliest preposition ("with", "in", "for", ...), else after the word nearest to
  the 6th (4 to 8) that is not an article, preposition or abbreviation. At least 3 words
  must remain after the cut.
- An unbreakable run (text without whitespace longer than `max_chars`: CJK text, a 4000-
  character "word") is cut inside, so no piece is ever longer than `max_chars`: after the
  last CJK or other sentence/clause punctuation (。、！？，；：.,;:!?) that fits, else at the
  last character boundary that fits, never inside a grapheme cluster (not before a
  combining mark, a variation selector, an emoji modifier or after a zero-width joiner).
  Voices take time and memory that grow faster than the length of a piece, so this bound
  is what keeps one piece cheap whatever the text.
Lengths are counted without the surrounding whitespace; every other cut lands where
whitespace is followed by a word, so no number, price, URL or e-mail address within
`max_chars` is ever cut inside.

(Over 300 lines on purpose: these rules interlock — where a clause may end decides where
the first piece may — and are read best in one place.)
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import pysbd

MIN_WORDS = 3  # below this a piece sounds clipped: "Yes." "OK." "Thank you."
MIN_CHARS = 12
SHORT_SENTENCE_WORDS = 8  # a first sentence this short is fast enough to synthesize whole
FIRST_MIN_WORDS = 4  # a shorter first piece has no room for natural prosody
FIRST_MAX_WORDS = 10
FIRST_TARGET_WORDS = 6  # fallback cut, when no boundary or conjunction helps
FIRST_FALLBACK_MAX_WORDS = 8
MIN_WINDOW = 200  # pysbd costs ~2.5 µs per char and a window, so windows stay small

_WORD = re.compile(r"\S+")
_WORD_START = re.compile(r"(?<=\s)\S")
_CLAUSE_END = re.compile(r"(?:[,;:!?\u2013\u2014\u2026]|\.\.\.|^-{1,2})[\"'\u2019\u201d)\]]*$")
_EDGE_PUNCT = "\"'()[]{}.,;:!?\u2018\u2019\u201c\u201d\u2026"
# Where an unbreakable run is best cut: after a sentence mark, else after a clause mark
# (CJK full-width or ASCII), as late as fits.
_RUN_SENTENCE_ENDS = frozenset("\u3002\uff01\uff1f\uff0e.!?\u2026")
_RUN_CLAUSE_ENDS = frozenset("\u3001\uff0c\uff1b\uff1a,;:")
_ZWJ = "\u200d"

_CONJUNCTIONS = frozenset({
    "and", "but", "or", "nor", "so", "yet", "because", "which", "that", "who", "whom", "whose",
    "while", "when", "whenever", "where", "wherever", "whereas", "although", "though", "if",
    "unless", "until", "since", "after", "before",
})  # fmt: skip
_PREPOSITIONS = frozenset({
    "with", "without", "in", "on", "at", "for", "from", "into", "onto", "over", "under",
    "through", "during", "about", "across", "between", "against", "toward", "towards", "by",
    "near", "behind", "beyond", "to",
})  # fmt: skip
# Words a piece should not end on: the listener would hear a dangling phrase.
_GLUE = frozenset({
    "a", "an", "the", "this", "these", "those", "my", "your", "his", "her", "its", "our",
    "their", "to", "of", "in", "on", "at", "for", "with", "from", "by", "as", "and", "or",
    "but", "nor", "than", "that", "which", "who", "very", "i",
})  # fmt: skip


class _Sentence(NamedTuple):
    start: int
    end: int
    inner: tuple[int, ...] = ()  # boundaries of short sentences merged into this one


def split_pieces(text: str, *, short_first: bool = True, max_chars: int = 250) -> list[str]:
    """All pieces of `text`, in order; `"".join(pieces) == text` when `text` has a word.

    Text without a non-space character gives `[]`: there is nothing to synthesize.
    """
    return list(iter_pieces(text, short_first=short_first, max_chars=max_chars))


def iter_pieces(text: str, *, short_first: bool = True, max_chars: int = 250) -> Iterator[str]:
    """The pieces of `split_pieces`, segmented lazily: the first is ready after one window.

    Error handling: `max_chars` below 1 raises `ValueError` before anything is yielded.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, not {max_chars}")
    return _pieces(text, short_first, max_chars)


def _pieces(text: str, short_first: bool, max_chars: int) -> Iterator[str]:
    if not text or text.isspace():
        return
    spans = _sentence_spans(text, window_size(max_chars))
    yield from pieces_of_sentences(text, _merge_short(text, spans, max_chars), short_first, max_chars)


def window_size(max_chars: int) -> int:
    """How many characters pysbd sees at once (also used by `pipeline.stream_text`)."""
    return max(MIN_WINDOW, 2 * max_chars)


def pieces_of_sentences(
    text: str, sentences: Iterable[_Sentence], short_first: bool, max_chars: int
) -> Iterator[str]:
    """The pieces of merged sentences, each sentence's pieces yielded before the next is
    pulled (`pipeline.stream_text` relies on that to know which pieces are final)."""
    for index, sentence in enumerate(sentences):
        start = sentence.start
        if index == 0 and short_first:
            cut = _first_cut(text, sentence, max_chars)
            if cut is not None:
                yield text[start:cut]
                start = cut
        for piece_start, piece_end in _split_long(text, start, sentence.end, max_chars):
            yield from _bound_runs(text[piece_start:piece_end], max_chars)


def _sentence_spans(text: str, window: int) -> Iterator[tuple[int, int]]:
    """Contiguous (start, end) sentence spans covering `text`, pysbd run window by window."""
    # One per call: a Segmenter keeps the text it works on, so sharing one is not thread-safe.
    segmenter = pysbd.Segmenter(language="en", clean=False, char_span=True)
    pos = 0
    while True:
        stop = len(text) if len(text) - pos <= window else _window_stop(text, pos, window)
        cuts = _window_cuts(segmenter, text, pos, stop)
        if stop == len(text):
            for cut in cuts:
                yield pos, cut
                pos = cut
            yield pos, stop
            return
        # The window's last sentence may go on past it: it is segmented again next round.
        # No boundary at all means a sentence longer than the window: `stop` cuts it.
        for cut in cuts or [stop]:
            yield pos, cut
            pos = cut


def _window_cuts(segmenter: pysbd.Segmenter, text: str, pos: int, stop: int) -> list[int]:
    """Sentence starts pysbd finds in `text[pos:stop]`, kept where whitespace precedes a word."""
    cuts: list[int] = []
    for span in segmenter.segment(text[pos:stop]):
        cut = pos + span.start
        after = cuts[-1] if cuts else pos
        if (
            after < cut < stop
            and text[cut - 1].isspace()
            and not text[cut].isspace()
            and not text[after:cut].isspace()
        ):
            cuts.append(cut)
    return cuts


def _window_stop(text: str, pos: int, window: int) -> int:
    """A word start near `pos + window`: after a clause in the window's second half if any."""
    last_word = last_clause = None
    previous = None
    for match in _WORD.finditer(text, pos, pos + window):
        if previous is not None and match.end() < pos + window:
            last_word = match.start()
            if _CLAUSE_END.search(previous) and match.start() >= pos + window // 2:
                last_clause = match.start()
        previous = match.group()
    if last_clause is not None:
        return last_clause
    if last_word is not None:
        return last_word
    following = _WORD_START.search(text, pos + window)
    return following.start() if following else len(text)


def _merge_short(
    text: str, spans: Iterable[tuple[int, int]], max_chars: int
) -> Iterator[_Sentence]:
    """Sentences with the short ones joined to a neighbour (the next one by preference)."""
    done: _Sentence | None = None  # final, unless a short successor falls back onto it
    current: _Sentence | None = None
    for start, end in spans:
        following = _Sentence(start, end)
        if current is None:
            current = following
            continue
        if _is_short(text, current.start, current.end):
            if _fits(text, current.start, end, max_chars):
                current = _join(current, following)
                continue
            if done is not None and _fits(text, done.start, current.end, max_chars):
                current = _join(done, current)
                done = None
        if done is not None:
            yield done
        done, current = current, following
        if not _is_short(text, current.start, current.end):
            yield done
            done = None
    if (
        current is not None
        and done is not None
        and _is_short(text, current.start, current.end)
        and _fits(text, done.start, current.end, max_chars)
    ):
        current, done = _join(done, current), None
    if done is not None:
        yield done
    if current is not None:
        yield current


def _join(first: _Sentence, second: _Sentence) -> _Sentence:
    return _Sentence(first.start, second.end, first.inner + (second.start,) + second.inner)


def _is_short(text: str, start: int, end: int) -> bool:
    words = text[start:end].split()
    return len(words) < MIN_WORDS or len(" ".join(words)) < MIN_CHARS


def _fits(text: str, start: int, end: int, max_chars: int) -> bool:
    return len(text[start:end].strip()) <= max_chars


def _words(text: str, start: int, end: int) -> tuple[list[int], list[int], list[str]]:
    """Start offsets, end offsets and texts of the words in `text[start:end]`."""
    matches = list(_WORD.finditer(text, start, end))
    return [m.start() for m in matches], [m.end() for m in matches], [m.group() for m in matches]


def _bare(word: str) -> str:
    return word.strip(_EDGE_PUNCT).lower()


def _is_glue(word: str) -> bool:
    """True for a word a piece should not end on (also abbreviations and initials)."""
    return word.endswith(".") or _bare(word) in _GLUE


def _first_cut(text: str, sentence: _Sentence, max_chars: int) -> int | None:
    """Where the quick first piece ends, or None to keep the first sentence whole."""
    starts, ends, words = _words(text, sentence.start, sentence.end)
    body_words = len(starts)  # a short sentence merged onto the end does not count
    if sentence.inner and _is_short(text, sentence.inner[-1], sentence.end):
        body_words = bisect.bisect_left(starts, sentence.inner[-1])
    if body_words <= SHORT_SENTENCE_WORDS:
        return None
    last = min(FIRST_MAX_WORDS, len(starts) - MIN_WORDS)
    allowed = [
        k
        for k in range(FIRST_MIN_WORDS, last + 1)
        if ends[k - 1] - starts[0] <= max_chars and not _is_short(text, starts[k], sentence.end)
    ]
    inner = set(sentence.inner)
    rules: tuple[Callable[[int], bool], ...] = (
        lambda k: bool(_CLAUSE_END.search(words[k - 1])) or starts[k] in inner,
        lambda k: _bare(words[k]) in _CONJUNCTIONS,
        lambda k: _bare(words[k]) in _PREPOSITIONS,
    )
    for rule in rules:
        for k in allowed:
            if rule(k):
                return starts[k]
    fallback = [k for k in allowed if k <= FIRST_FALLBACK_MAX_WORDS and not _is_glue(words[k - 1])]
    chosen = fallback or allowed
    if not chosen:
        return None
    return starts[min(chosen, key=lambda k: (abs(k - FIRST_TARGET_WORDS), k))]


def _bound_runs(piece: str, max_chars: int) -> Iterator[str]:
    """`piece` unchanged, or cut inside its unbreakable runs until every part fits."""
    rest = piece
    while len(rest.strip()) > max_chars:
        lead = len(rest) - len(rest.lstrip())
        cut = _run_cut(rest, lead, lead + max_chars)
        yield rest[:cut]
        rest = rest[cut:]
    if rest:
        yield rest


def _run_cut(text: str, start: int, limit: int) -> int:
    """The best cut in `text` after `start` and at most at `limit`: a word start, else just
    after a sentence mark, then a clause mark, in the second half of the room, else the
    last grapheme boundary (always > start)."""
    word = None  # the last word start that leaves the part short enough (whitespace is free)
    for match in _WORD_START.finditer(text, start + 1):
        if len(text[start : match.start()].rstrip()) > limit - start:
            break
        word = match.start()
    if word is not None:
        return word
    for marks in (_RUN_SENTENCE_ENDS, _RUN_CLAUSE_ENDS):
        for cut in range(limit, start + (limit - start) // 2, -1):
            if text[cut - 1] in marks and _grapheme_boundary(text, cut):
                return cut
    for cut in range(limit, start, -1):
        if _grapheme_boundary(text, cut):
            return cut
    return limit  # a cluster longer than the limit (hundreds of combining marks)


def _grapheme_boundary(text: str, at: int) -> bool:
    """False where cutting before `text[at]` would split a user-perceived character."""
    if at >= len(text):
        return True
    following, previous = text[at], text[at - 1]
    return not (
        unicodedata.combining(following)
        or unicodedata.category(following) in ("Mn", "Me", "Mc")
        or following == _ZWJ
        or previous == _ZWJ
        or "\ufe00" <= following <= "\ufe0f"
        or "\U0001f3fb" <= following <= "\U0001f3ff"
        or "\U000e0020" <= following <= "\U000e007f"  # emoji tag sequences
    )


def _split_long(text: str, start: int, end: int, max_chars: int) -> Iterator[tuple[int, int]]:
    """`text[start:end]` as spans of at most `max_chars` (stripped) unless one word is longer."""
    if _fits(text, start, end, max_chars):
        yield start, end
        return
    starts, ends, words = _words(text, start, end)
    first = 0  # index of the first word of the piece being built
    pos = start
    while ends[-1] - starts[first] > max_chars and first < len(starts) - 1:
        cut = _best_cut(starts, ends, words, first, max_chars)
        yield pos, starts[cut]
        pos, first = starts[cut], cut
    yield pos, end


def _best_cut(
    starts: list[int], ends: list[int], words: list[str], first: int, max_chars: int
) -> int:
    """Index of the word that starts the next piece: clause boundary first, word boundary last."""
    last_fitting = bisect.bisect_right(ends, starts[first] + max_chars)  # words first..this-1 fit
    candidates = range(first + 1, min(last_fitting, len(starts) - 1) + 1)
    if not candidates:
        return first + 1  # a single word longer than max_chars: a piece of its own
    target = (starts[first] + ends[-1]) / 2

    def key(k: int) -> tuple[int, int, float]:
        piece_len = ends[k - 1] - starts[first]
        rest_len = ends[-1] - starts[k]
        rest_fits = rest_len <= max_chars
        if _CLAUSE_END.search(words[k - 1]):
            rank = 0
        elif _bare(words[k]) in _CONJUNCTIONS and (rest_fits or piece_len >= max_chars // 2):
            rank = 1
        elif _is_glue(words[k - 1]):
            rank = 3
        else:
            rank = 2
        if k - first < MIN_WORDS or piece_len < MIN_CHARS or (
            rest_fits and (len(starts) - k < MIN_WORDS or rest_len < MIN_CHARS)
        ):
            rank += 4
        # When the rest fits in one piece, balance the two; otherwise fill this one.
        return rank, 0 if rest_fits else 1, abs(starts[k] - target) if rest_fits else -k

    return min(candidates, key=key)
