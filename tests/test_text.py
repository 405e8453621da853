"""Text segmentation: the hard cases a listener would notice, and properties for every input.

Hard cases assert whole piece lists, so a change in where pieces start is visible here;
the hypothesis properties hold for any text and any `max_chars`.
"""

from __future__ import annotations

import itertools
import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.text import iter_pieces, split_pieces

LONG_FIRST = (
    "When the storm finally passed over the little village, the people came out of their "
    "houses to look at the damage. "
)


def sentences(text: str) -> list[str]:
    return split_pieces(text, short_first=False)


# --- things that must never be cut ---------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "Dr. Smith met Mr. Jones at noon. They talked about the weather.",
            ["Dr. Smith met Mr. Jones at noon. ", "They talked about the weather."],
        ),
        (
            "Bring fruit, e.g. Apples from Spain. Then we eat them all together.",
            ["Bring fruit, e.g. Apples from Spain. ", "Then we eat them all together."],
        ),
        (
            "Use the big one, i.e. The red box. It is in the hall cupboard.",
            ["Use the big one, i.e. The red box. ", "It is in the hall cupboard."],
        ),
        (
            "We bought pens, paper, etc. and went home. Next day we wrote a letter.",
            ["We bought pens, paper, etc. and went home. ", "Next day we wrote a letter."],
        ),
        (
            "I moved to the U.S. last year. The U.S. Army band played on.",
            ["I moved to the U.S. last year. ", "The U.S. Army band played on."],
        ),
        (
            "Pi is about 3.14 and costs $29.99 today. The offer ends on Friday.",
            ["Pi is about 3.14 and costs $29.99 today. ", "The offer ends on Friday."],
        ),
        (
            "J. R. R. Tolkien wrote it in 1937. It is still read today.",
            ["J. R. R. Tolkien wrote it in 1937. ", "It is still read today."],
        ),
        (
            "Visit https://example.com/a.b?c=d for more. Or write to a.b@c.org today.",
            ["Visit https://example.com/a.b?c=d for more. ", "Or write to a.b@c.org today."],
        ),
    ],
)
def test_sentence_ends_are_not_confused_with_dots_inside_sentences(
    text: str, expected: list[str]
) -> None:
    assert sentences(text) == expected
    assert split_pieces(text) == expected  # first sentences of at most 8 words stay whole


def test_ellipsis_before_lowercase_continues_the_sentence() -> None:
    text = "He paused... and then he spoke very quietly. The room was silent for a while."
    assert sentences(text) == [
        "He paused... and then he spoke very quietly. ",
        "The room was silent for a while.",
    ]


def test_ellipsis_fragments_are_merged_not_spoken_alone() -> None:
    text = "Well... I really do not know what to say. Maybe... we could wait."
    assert sentences(text) == [
        "Well... I really do not know what to say. ",
        "Maybe... we could wait.",
    ]


def test_a_long_sentence_is_never_cut_inside_an_url_or_a_number() -> None:
    # The 70-character URL fits in a piece (a run longer than max_chars would be cut).
    url = "https://example.com/some/long/path/file.tar.gz?version=3.14&mirror=eu"
    text = f"Download it from {url} and check that it costs $1,299.99 before you pay. " * 4
    pieces = split_pieces(text, max_chars=80)
    assert "".join(pieces) == text
    assert all(url in p or "example.com" not in p for p in pieces)
    assert all("$1,299.99" in p or "1,299" not in p for p in pieces)


# --- short fragments -----------------------------------------------------------------


def test_short_sentences_join_the_next_one() -> None:
    assert split_pieces("Yes. OK. Fine then, let us go now.") == [
        "Yes. OK. Fine then, let us go now."
    ]


def test_a_short_last_sentence_joins_the_previous_one() -> None:
    text = "Thanks a lot for coming to the meeting today. OK."
    assert sentences(text) == [text]
    assert sentences("The report is finished and sent. The review starts Monday. Bye.") == [
        "The report is finished and sent. ",
        "The review starts Monday. Bye.",
    ]


def test_short_sentences_are_not_merged_past_max_chars() -> None:
    text = "A" * 30 + " is a long word indeed. Yes."
    assert split_pieces(text, max_chars=30) == ["A" * 30 + " ", "is a long word indeed. ", "Yes."]


# --- the quick first piece -------------------------------------------------------------


def test_first_piece_is_the_first_clause() -> None:
    assert split_pieces(LONG_FIRST + "They were glad.") == [
        "When the storm finally passed over the little village, ",
        "the people came out of their houses to look at the damage. ",
        "They were glad.",
    ]


def test_first_piece_then_whole_sentences() -> None:
    text = LONG_FIRST + "Some roofs were gone, and two trees had fallen onto the road. " * 2
    assert split_pieces(text) == [
        "When the storm finally passed over the little village, ",
        "the people came out of their houses to look at the damage. ",
        "Some roofs were gone, and two trees had fallen onto the road. ",
        "Some roofs were gone, and two trees had fallen onto the road. ",
    ]


def test_without_short_first_the_first_sentence_stays_whole() -> None:
    assert sentences(LONG_FIRST) == [LONG_FIRST]


def test_a_clause_of_fewer_than_four_words_is_not_a_first_piece() -> None:
    text = "Hello, I am your assistant and I will read this long message for you today."
    assert split_pieces(text) == [
        "Hello, I am your assistant ",
        "and I will read this long message for you today.",
    ]


def test_without_a_clause_the_first_piece_ends_before_a_conjunction() -> None:
    text = "The quick brown fox jumps over the lazy dog that sleeps in the warm sun."
    assert split_pieces(text) == [
        "The quick brown fox jumps over the lazy dog ",
        "that sleeps in the warm sun.",
    ]


def test_without_a_conjunction_the_first_piece_ends_before_a_preposition() -> None:
    text = "My old grey cat sleeps all afternoon with her nose under her tail."
    assert split_pieces(text) == [
        "My old grey cat sleeps all afternoon ",
        "with her nose under her tail.",
    ]


def test_fallback_first_piece_does_not_end_on_an_article_or_abbreviation() -> None:
    text = "Yesterday our tall neighbour Mr. Brown painted the whole garden fence bright green."
    first = split_pieces(text)[0]
    assert first == "Yesterday our tall neighbour Mr. Brown "
    assert 4 <= len(first.split()) <= 8


def test_a_short_first_sentence_stays_whole() -> None:
    text = "The storm has passed. The people of the village came out to look at the damage."
    assert split_pieces(text)[0] == "The storm has passed. "


def test_a_short_sentence_merged_onto_the_first_keeps_it_whole() -> None:
    text = "Mr. Jones went to the U.S. last year. It was fun."
    assert split_pieces(text) == [text]


# --- maximum length --------------------------------------------------------------------


def test_long_sentence_is_cut_at_clauses_within_max_chars() -> None:
    text = (
        "The committee met on Tuesday, after a long delay caused by the weather, "
        "and it discussed the budget, the new building, the staff rota and the summer fair; "
        "in the end it agreed on almost everything, except the colour of the new doors."
    )
    pieces = split_pieces(text, short_first=False, max_chars=100)
    assert "".join(pieces) == text
    assert all(len(p.strip()) <= 100 for p in pieces)
    assert all(p.rstrip()[-1] in ",;." for p in pieces)


def test_long_sentence_without_clauses_is_cut_between_words_not_after_articles() -> None:
    text = " ".join(["the big dog ran to the old barn near the river bank"] * 6) + "."
    pieces = split_pieces(text, short_first=False, max_chars=50)
    assert "".join(pieces) == text
    assert all(len(p.strip()) <= 50 for p in pieces)
    assert all(p.split()[-1] not in {"the", "to"} for p in pieces[:-1])


def test_a_word_longer_than_max_chars_is_cut_inside_into_pieces_that_fit() -> None:
    word = "x" * 40
    text = f"Here comes {word} and more."
    assert split_pieces(text, short_first=False, max_chars=20) == [
        "Here comes ",
        "x" * 20,
        "x" * 20 + " ",
        "and more.",
    ]


def test_cjk_text_without_spaces_is_cut_after_a_sentence_mark_within_max_chars() -> None:
    text = "今天天气很好，我们去公园散步。" * 30  # 450 characters, no whitespace
    pieces = split_pieces(text)
    assert "".join(pieces) == text
    assert all(len(p) <= 250 for p in pieces)
    assert all(p.endswith("。") for p in pieces)


def test_a_4000_character_word_becomes_pieces_of_at_most_max_chars() -> None:
    text = "a" * 4000
    pieces = split_pieces(text)
    assert "".join(pieces) == text and len(pieces) == 16
    assert all(len(p) <= 250 for p in pieces)


def test_a_run_is_not_cut_inside_a_grapheme_cluster() -> None:
    accented = "e\u0301" * 200  # 400 code points, 200 user-perceived characters
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467" * 60  # emoji joined by ZWJ
    for text in (accented, family):
        pieces = split_pieces(text, max_chars=99)
        assert "".join(pieces) == text
        for piece in pieces:
            assert len(piece) <= 99
            assert not unicodedata.combining(piece[0]) and piece[0] != "\u200d" and piece[-1] != "\u200d"


def test_long_text_across_windows_gives_whole_sentences() -> None:
    sentence = "Dr. Ellen Harper, who studies coastal history, read the notes of 1887. "
    text = sentence * 60
    assert sentences(text) == [sentence] * 60


# --- edges -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", " ", "\n\t  "])
def test_nothing_to_say_gives_no_piece(text: str) -> None:
    assert split_pieces(text) == []


def test_surrounding_whitespace_stays_in_the_pieces() -> None:
    assert split_pieces("  Hello there, my friend.  \n") == ["  Hello there, my friend.  \n"]


def test_max_chars_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_chars"):
        split_pieces("Hello.", max_chars=0)


def test_iter_pieces_gives_the_first_piece_of_a_long_text() -> None:
    text = LONG_FIRST * 100
    first = next(iter_pieces(text))
    assert first == "When the storm finally passed over the little village, "


# --- properties ------------------------------------------------------------------------

_TOKENS = st.sampled_from(
    [
        "the", "dog", "and", "which", "because", "with", "walked", "quickly", "Dr.", "Mr.",
        "e.g.", "i.e.", "etc.", "U.S.", "J.", "R.", "3.14", "$29.99", "1,000", "...", "…",
        "https://example.com/a.b?c=d", "a.b@c.org", "Yes.", "OK.", "No!", "Why?", "—", "-",
        "well,", "then;", "so:", "end.", "Stop.", "(aside)", '"quoted."', "x" * 30,
    ]
)
_SEPARATORS = st.sampled_from([" ", " ", " ", "  ", "\n", "\n\n", "\t", ""])


@st.composite
def _texts(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(_TOKENS, max_size=80))
    return "".join(token + draw(_SEPARATORS) for token in tokens)


_any_text = st.one_of(_texts(), st.text(max_size=300))
_max_chars = st.integers(min_value=1, max_value=300)


@settings(max_examples=300, deadline=None)
@given(text=_any_text, max_chars=_max_chars, short_first=st.booleans())
def test_pieces_give_back_the_text(text: str, max_chars: int, short_first: bool) -> None:
    pieces = split_pieces(text, short_first=short_first, max_chars=max_chars)
    if text.strip():
        assert "".join(pieces) == text
    else:
        assert pieces == []


@settings(max_examples=300, deadline=None)
@given(text=_any_text, max_chars=_max_chars, short_first=st.booleans())
def test_no_piece_is_blank(text: str, max_chars: int, short_first: bool) -> None:
    pieces = split_pieces(text, short_first=short_first, max_chars=max_chars)
    assert all(p.strip() for p in pieces)


@settings(max_examples=300, deadline=None)
@given(text=_any_text, max_chars=_max_chars, short_first=st.booleans())
def test_no_piece_is_longer_than_max_chars(text: str, max_chars: int, short_first: bool) -> None:
    for piece in split_pieces(text, short_first=short_first, max_chars=max_chars):
        assert len(piece.strip()) <= max_chars


@settings(max_examples=200, deadline=None)
@given(text=_any_text, max_chars=_max_chars, short_first=st.booleans())
def test_pieces_are_deterministic_and_lazy_iteration_agrees(
    text: str, max_chars: int, short_first: bool
) -> None:
    pieces = split_pieces(text, short_first=short_first, max_chars=max_chars)
    assert split_pieces(text, short_first=short_first, max_chars=max_chars) == pieces
    assert list(iter_pieces(text, short_first=short_first, max_chars=max_chars)) == pieces


@settings(max_examples=200, deadline=None)
@given(text=_any_text, max_chars=_max_chars, short_first=st.booleans())
def test_every_cut_falls_between_whitespace_and_a_word_or_inside_a_run_too_long(
    text: str, max_chars: int, short_first: bool
) -> None:
    pieces = split_pieces(text, short_first=short_first, max_chars=max_chars)
    offset = 0
    for before, after in itertools.pairwise(pieces):
        offset += len(before)
        if before[-1].isspace():
            assert not after[0].isspace()
        else:  # inside a run: only when the whole run does not fit in one piece
            assert not after[0].isspace()
            run = re.search(r"\S*$", text[:offset]).group() + re.match(r"\S*", text[offset:]).group()
            assert len(run) > max_chars


_cjk = st.lists(
    st.sampled_from(list("今天天气很好我们去公园散步。，！？、") + ["e\u0301", "\u200d"]), min_size=1, max_size=1200
).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=_cjk, max_chars=st.integers(min_value=1, max_value=300), short_first=st.booleans())
def test_unbroken_text_gives_back_the_text_in_pieces_that_fit(text: str, max_chars: int, short_first: bool) -> None:
    pieces = split_pieces(text, short_first=short_first, max_chars=max_chars)
    assert "".join(pieces) == text
    assert all(0 < len(p) <= max_chars for p in pieces)
