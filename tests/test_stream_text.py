"""Streamed text: the pieces released while text arrives are those of the whole text.

A listener hears the pieces the segmenter releases; these tests hold that they do not depend
on how the text was cut into appends, that a piece comes out as soon as it is final, and that
`flush` is the only thing that forces a cut.
"""

from __future__ import annotations

import itertools
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.stream_text import StreamSegmenter
from pipeline.text import split_pieces

THREE_SENTENCES = (
    "When the storm finally passed over the little village, the people came out of their "
    "houses to look at the damage. Dr. Smith paid $29.99 for 3.14 kg of apples, e.g. Golden "
    "ones from the U.S. market. Yes. They were glad!"
)


def streamed(parts: list[str], **options: object) -> list[str]:
    """Every piece released by appending `parts` in turn and flushing once at the end."""
    segmenter = StreamSegmenter(**options)
    pieces: list[str] = []
    for part in parts:
        pieces += segmenter.append(part)
    pieces += segmenter.flush()
    assert segmenter.held_chars == 0
    return pieces


# --- the same pieces whatever the appends ------------------------------------------


def test_every_two_part_split_gives_the_pieces_of_the_whole_text() -> None:
    whole = split_pieces(THREE_SENTENCES)
    assert len(whole) >= 4  # the first clause, then sentences: the test covers every rule
    for at in range(1, len(THREE_SENTENCES)):
        assert streamed([THREE_SENTENCES[:at], THREE_SENTENCES[at:]]) == whole, at


def test_single_characters_give_the_pieces_of_the_whole_text() -> None:
    assert streamed(list(THREE_SENTENCES)) == split_pieces(THREE_SENTENCES)


def test_without_short_first_too() -> None:
    whole = split_pieces(THREE_SENTENCES, short_first=False)
    assert streamed(list(THREE_SENTENCES), short_first=False) == whole


_TOKENS = st.sampled_from(
    [
        "the", "dog", "and", "which", "because", "with", "walked", "quickly", "Dr.", "Mr.",
        "e.g.", "i.e.", "U.S.", "J.", "3.14", "$29.99", "1,000", "...", "…", "Yes.", "OK.",
        "No!", "Why?", "—", "well,", "then;", "so:", "end.", "Stop.", "(aside)", '"quoted."',
        "Smith", "Apples", "He", "今天天气很好。", "我们去公园，", "x" * 30,
    ]
)  # fmt: skip
_SEPARATORS = st.sampled_from([" ", " ", " ", " ", "  ", "\n", "\n\n", ""])


@st.composite
def _texts(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(_TOKENS, min_size=1, max_size=120))
    return "".join(token + draw(_SEPARATORS) for token in tokens)


@st.composite
def _splits(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = draw(_texts())
    cuts = sorted(draw(st.sets(st.integers(min_value=1, max_value=max(1, len(text) - 1)), max_size=60)))
    edges = [0, *[c for c in cuts if c < len(text)], len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(edges)]


@settings(max_examples=300, deadline=None)
@given(split=_splits(), short_first=st.booleans(), max_chars=st.sampled_from([40, 80, 120, 250]))
def test_any_split_into_appends_gives_the_pieces_of_the_whole_text(
    split: tuple[str, list[str]], short_first: bool, max_chars: int
) -> None:
    text, parts = split
    assert streamed(parts, short_first=short_first, max_chars=max_chars) == split_pieces(
        text, short_first=short_first, max_chars=max_chars
    )


@settings(max_examples=100, deadline=None)
@given(text=_texts())
def test_one_character_at_a_time_gives_the_pieces_of_the_whole_text(text: str) -> None:
    assert streamed(list(text)) == split_pieces(text)


def words_of(text: str) -> list[str]:
    """`text` as an assistant sends it: one word and its following space per append."""
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


MILL = (
    "The old mill by the river had stood there quietly for more than two hundred long years "
    "and all the people loved it, even though nobody ground corn there."
)
MILL_NEXT = " The new owners want to turn the whole building into a small museum. Fine."


def test_a_sentence_longer_than_a_window_is_cut_where_whole_text_cuts_it() -> None:
    # Whole text forces a cut inside a sentence longer than pysbd's window (200 here);
    # the stream must close its windows at the same places.
    long = (
        "The village council met again on the first warm evening of the spring, and the "
        "members talked for hours about the road, the bridge, the school roof and the old "
        "mill by the river, which nobody had repaired since the great flood of the winter "
        "before, while the children played outside in the square until it was dark. "
    )
    text = "It was late. " + long + "Dr. Smith agreed with all of them. " + long + "They went home."
    for max_chars in (60, 100):
        whole = split_pieces(text, max_chars=max_chars)
        assert streamed(words_of(text), max_chars=max_chars) == whole
        assert streamed(list(text), max_chars=max_chars) == whole


def test_a_boundary_late_in_an_open_window_waits_for_the_window_to_close() -> None:
    # The first sentence (153 characters) ends past half the window, after a clause in
    # that half: whole text cuts at the clause, so the stream may not trust the period.
    text = MILL + MILL_NEXT
    for short_first in (False, True):
        whole = split_pieces(text, max_chars=100, short_first=short_first)
        assert streamed(words_of(text), max_chars=100, short_first=short_first) == whole


def test_after_an_early_first_piece_the_rest_of_the_sentence_is_cut_as_whole_text_cuts_it() -> None:
    text = MILL.replace("there.", "in it for a very long time now.") + MILL_NEXT
    whole = split_pieces(text, max_chars=100)
    assert len(whole[0].split()) <= 10 and len(whole) == 4  # quick first piece, rest in two
    assert streamed(words_of(text), max_chars=100) == whole


# --- released as soon as final, held otherwise -------------------------------------


def test_a_sentence_is_released_while_the_next_one_is_still_being_written() -> None:
    segmenter = StreamSegmenter(short_first=False)
    assert segmenter.append("The report is finished and sent to everyone. The review") == []
    released = segmenter.append(" starts on Monday")
    assert released == ["The report is finished and sent to everyone. "]
    assert segmenter.held_chars == len("The review starts on Monday")


def test_the_first_clause_is_released_before_the_first_sentence_ends() -> None:
    segmenter = StreamSegmenter()
    released: list[str] = []
    for word in THREE_SENTENCES.split(" ")[:16]:
        released += segmenter.append(word + " ")
    assert released == ["When the storm finally passed over the little village, "]


def test_a_short_sentence_is_held_until_the_merge_is_decided() -> None:
    segmenter = StreamSegmenter(short_first=False)
    assert segmenter.append("The report is finished and sent. The review starts Monday. ") == [
        "The report is finished and sent. "
    ]
    assert segmenter.append("Bye. ") == []  # "Bye." may join the next sentence or this one
    assert segmenter.flush() == ["The review starts Monday. Bye. "]


def test_a_tail_without_a_boundary_is_released_only_by_flush() -> None:
    segmenter = StreamSegmenter()
    text = "And then there was nothing more to say"  # eight words: one piece
    assert segmenter.append(text) == []
    assert segmenter.append(" ") == []
    assert segmenter.held_chars == len(text) + 1
    assert segmenter.flush() == [text + " "]
    assert segmenter.held_chars == 0
    assert segmenter.flush() == []


def test_flush_in_the_middle_forces_a_cut() -> None:
    first = "Dr. Smith paid $29.99 for the apples, and he"
    second = " was glad about it. They tasted great today."
    segmenter = StreamSegmenter()
    pieces = []
    for part in (first[:20], first[20:]):
        pieces += segmenter.append(part)
    pieces += segmenter.flush()
    assert pieces == split_pieces(first)
    after = []
    for part in (second[:9], second[9:]):
        after += segmenter.append(part)
    after += segmenter.flush()
    # The quick first piece is for the utterance's first audio only.
    assert after == split_pieces(second, short_first=False)
    assert "".join(pieces + after) == first + second


def test_whitespace_alone_at_a_flush_is_dropped() -> None:
    segmenter = StreamSegmenter()
    assert segmenter.append("  \n") == []
    assert segmenter.flush() == []
    assert streamed(["  ", "Hello there, my friend.", "  \n"]) == ["  Hello there, my friend.  \n"]


def test_released_text_is_not_kept() -> None:
    segmenter = StreamSegmenter(short_first=False)
    sentence = "Dr. Ellen Harper, who studies coastal history, read the notes of 1887. "
    for _ in range(200):
        for word in sentence.split(" "):
            segmenter.append(word + " ")
        assert segmenter.held_chars < 3 * len(sentence)
    assert len(segmenter._buf) < 1200  # two windows and a sentence at most


def test_max_chars_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_chars"):
        StreamSegmenter(max_chars=0)


# --- cost ---------------------------------------------------------------------------


def test_cost_of_4kb_appended_word_by_word(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints the numbers for the report; asserts only that the pieces are right."""
    sentence = "Dr. Smith paid $29.99 for 3.14 kg of apples, e.g. Golden ones from the U.S. market. "
    text = (sentence * (4096 // len(sentence) + 1))[:4096]
    words = [w + " " for w in text.split(" ")]
    segmenter = StreamSegmenter()
    pieces: list[str] = []
    worst = 0.0
    begin = time.perf_counter()
    for word in words:
        start = time.perf_counter()
        pieces += segmenter.append(word)
        worst = max(worst, time.perf_counter() - start)
    total = time.perf_counter() - begin
    pieces += segmenter.flush()
    assert "".join(pieces) == "".join(words)
    with capsys.disabled():
        print(f"\n4 KB in {len(words)} appends: total {total * 1000:.1f} ms, worst append {worst * 1000:.2f} ms")
