"""The rules of pipeline.timing, pipeline.visemes and piper_align for every input
(hypothesis; no voice, no network): estimates cover each piece, the utterance's clock keeps
words ordered and visemes contiguous whatever the pieces say, offsets find the pieces."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.providers.piper_align import _owners
from pipeline.text import split_pieces
from pipeline.timing import Estimate, OffsetFinder, PieceTiming, TimedViseme, TimedWord, Timeline, Timing, words_of
from pipeline.visemes import VISEMES, letter_visemes, phoneme_visemes

WORD = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789$%.,'-"), min_size=1, max_size=12)


@given(st.lists(WORD, min_size=1, max_size=30), st.integers(min_value=100, max_value=200_000))
def test_an_estimate_places_every_word_once_on_the_pieces_audio(tokens, total):
    words = [(w, k) for k, w in enumerate(tokens)]
    timing = Estimate(words).place(total)
    assert [index for index, _, _ in timing.words] == list(range(len(words)))
    edges = [(start, end) for _, start, end in timing.words]
    assert edges[0][0] == 0 and edges[-1][1] == total
    assert all(a < b for a, b in edges) and all(x[1] == y[0] for x, y in zip(edges, edges[1:]))
    assert timing.visemes[0][1] == 0 and timing.visemes[-1][2] == total
    assert all(x[2] == y[1] for x, y in zip(timing.visemes, timing.visemes[1:]))


SPAN = st.tuples(st.integers(0, 5000), st.integers(1, 800))


@given(st.lists(st.tuples(st.lists(SPAN, min_size=1, max_size=6), st.integers(0, 20_000)), min_size=1, max_size=5))
def test_the_utterance_clock_keeps_words_ordered_and_visemes_contiguous(pieces):
    timeline = Timeline(24000)
    words, visemes = [], []
    for spans, origin in pieces:
        timing = PieceTiming(
            tuple((k, a, a + n) for k, (a, n) in enumerate(spans)),
            tuple(("aa", a, a + n) for a, n in spans),
        )
        placed = timeline.place("u1", [("w", 0)] * len(spans), 0, timing, origin, 22050, estimated=False)
        words += placed.words
        visemes += placed.visemes
    assert all(w.start < w.end for w in words)
    assert all(a.end <= b.start for a, b in zip(words, words[1:]))
    assert visemes[0].start == 0
    assert all(a.end == b.start and a.start < a.end for a, b in zip(visemes, visemes[1:]))


@given(st.text(min_size=1, max_size=400))
def test_offsets_find_every_piece_and_word_in_the_text(text):
    finder = OffsetFinder()
    finder.add(text)
    for piece in (p.strip() for p in split_pieces(text) if p.strip()):
        offset = finder.locate(piece)
        assert text[offset : offset + len(piece)] == piece
        for word, at in words_of(piece):
            assert text[offset + at : offset + at + len(word)] == word


@given(st.lists(st.sampled_from(list("^$ ,.ˈˌːʲabdefhiklmnoprstuvwzæðŋɑɔəɚɛɪɹʃʊʌʒθ")), max_size=60))
def test_every_phoneme_gets_one_of_the_fifteen_visemes(symbols):
    shapes = phoneme_visemes(symbols)
    assert len(shapes) == len(symbols) and set(shapes) <= set(VISEMES)


@given(st.text(max_size=30))
def test_letters_always_give_a_mouth_shape(word):
    assert letter_visemes(word) and set(letter_visemes(word)) <= set(VISEMES)


@given(st.lists(st.sampled_from("abcdə"), max_size=40), st.lists(st.sampled_from("abcdə"), max_size=40), st.data())
def test_phonemes_go_to_words_in_order(heard, said, data):
    labels = sorted(data.draw(st.lists(st.integers(0, 9), min_size=len(said), max_size=len(said))))
    owners = _owners(heard, list(range(len(heard))), said, labels)
    known = [o for o in owners if o is not None]
    assert known == sorted(known)
    assert len(owners) == len(heard)


# ---- the chunker: each item just before the chunk in which it begins, none for audio not sent


def _chunker_out(items):
    from tests.test_chunker import run_chunker

    return run_chunker(items)


def _timing(starts: list[int]) -> Timing:
    return Timing(
        "u1",
        tuple(TimedWord(f"w{k}", k, s, s + 100, False) for k, s in enumerate(starts)),
        tuple(TimedViseme("aa", s, s + 100, False) for s in starts),
    )


def test_the_chunker_sends_each_item_just_before_the_chunk_it_begins_in():
    from pipeline.flow import Audio, Frame, TimingNotice
    from tests.test_chunker import begin, end, ms

    starts = [0, 900, 1000, 4000, 23_999, 30_000]  # samples at 24 kHz; chunks 40, 80, 160, 200... ms
    out = _chunker_out([begin(), _timing(starts), Audio("u1", ms(1000)), end()])
    sent, released = 0, []
    pending: list[int] = []
    for item in out:
        if isinstance(item, TimingNotice):
            pending += [w.start_ms for w in getattr(item.event, "words", ())]
        elif isinstance(item, Frame):
            chunk_end = sent + len(item.pcm) // 2
            assert all(sent * 1000 // 24000 <= start <= chunk_end * 1000 / 24000 for start in pending)
            released += pending
            pending, sent = [], chunk_end
    assert released == [0, 38, 42, 167, 1000]  # ms; 1250 ms is after the audio: never sent


def test_the_chunker_sends_no_item_for_audio_not_sent():
    from pipeline.events import Status
    from pipeline.flow import Audio, TimingNotice
    from tests.test_chunker import begin, end, ms

    beyond = _timing([0, 24_000 * 2])  # the second begins after the audio
    out = _chunker_out([begin(), beyond, Audio("u1", ms(1000)), end()])
    words = [w.word for o in out if isinstance(o, TimingNotice) for w in getattr(o.event, "words", ())]
    assert words == ["w0"]
    cancelled = _chunker_out([begin(), _timing([0, 6960]), Audio("u1", ms(300)), end(Status.CANCELLED)])
    words = [w.word for o in cancelled if isinstance(o, TimingNotice) for w in getattr(o.event, "words", ())]
    assert words == ["w0"]  # the held last chunk (and what begins in it) is dropped on cancel
