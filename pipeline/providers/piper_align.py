"""The embedded voice's exact timings, computed inside its worker process (next to
piper_worker.py, standard library and pipeline.timing/visemes only): Piper's phoneme
alignments (samples per phoneme id) turned into the piece's words and visemes.

Which phonemes belong to which word: espeak phonemizes a whole clause, merging some words
("of the" → `ʌvðə`) and reading a number or an abbreviation as several words ("$29.99" →
`dˈɑːlɚ twˈɛnti nˈaɪn pɔɪnt …`). So each word of the text (pipeline.timing.words_of) is
also phonemized on its own, and the two phoneme sequences (letters only, no stress or
length marks) are matched with difflib: matched phonemes belong to their word; an unmatched
run between two matches is shared in order among the words unmatched there, and extra
phonemes join the word of their phoneme group. A word still without a phoneme (never seen
in English) takes the gap before the next word, or the second half of the previous one.
Times are whole model frames (256 samples, 11.6 ms at 22050 Hz).
"""

from __future__ import annotations

import difflib
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pipeline.timing import PieceTiming, words_of
from pipeline.visemes import STRESS_MARKS, phoneme_visemes

BOS, EOS, PAD = "^", "$", "_"
_GAPS = frozenset(" ^$_")


def symbol_samples(
    run: list[str], id_map: Mapping[str, Sequence[int]], id_samples: Sequence[int], audio_samples: int
) -> list[int] | None:
    """Samples of each symbol of `[BOS, *run, EOS]` (a symbol owns its ids and the pad
    after it, as Piper's own alignment does), scaled to `audio_samples`; None when the
    ids do not line up (the piece is then timed by estimate)."""
    pad = len(id_map.get(PAD, []))
    per: list[int] = []
    k = 0
    for symbol in [BOS, *run, EOS]:
        width = len(id_map.get(symbol, [])) if symbol in id_map else 0
        if width and symbol != EOS:
            width += pad
        per.append(int(sum(id_samples[k : k + width])))
        k += width
    total = sum(per)
    if k != len(id_samples) or total <= 0:
        return None
    if total != audio_samples:  # never seen; keep the sum equal to the audio anyway
        per = [round(n * audio_samples / total) for n in per]
        per[-1] += audio_samples - sum(per)
    return per


def _is_sound(symbol: str) -> bool:
    # Phoneme letters; stress and length marks are modifier letters (Lm), not matched.
    return unicodedata.category(symbol) in ("Ll", "Lu", "Lo")


def align(
    text: str,
    symbols: list[str],
    spans: list[tuple[int, int]],
    phonemize_word: Callable[[str], list[str]],
) -> PieceTiming:
    """The piece's timing: `symbols` are its phoneme symbols in order (with the voice's
    BOS/EOS), `spans` their (start, end) samples in the piece's audio (empty where the
    edge silence was cut)."""
    words = words_of(text)
    sounds = [i for i, s in enumerate(symbols) if _is_sound(s)]
    group = _groups(symbols)
    said: list[str] = []
    labels: list[int] = []
    for index, (word, _) in enumerate(words):
        letters = [s for s in phonemize_word(word) if _is_sound(s)]
        said += letters
        labels += [index] * len(letters)
    owner = _owners([symbols[i] for i in sounds], [group[i] for i in sounds], said, labels)
    firsts: dict[int, int] = {}
    lasts: dict[int, int] = {}
    for k, i in enumerate(sounds):
        if owner[k] is not None:
            firsts.setdefault(owner[k], i)  # type: ignore[arg-type]
            lasts[owner[k]] = i  # type: ignore[index]
    placed: list[tuple[int, int, int] | None] = []
    for index in range(len(words)):
        if index not in firsts:
            placed.append(None)
            continue
        first, last = firsts[index], lasts[index]
        while first > 0 and symbols[first - 1] in STRESS_MARKS:
            first -= 1  # a stress mark before the word's first sound
        while last + 1 < len(symbols) and _mark(symbols[last + 1]) and symbols[last + 1] not in STRESS_MARKS:
            last += 1  # a length mark after its last sound
        start, end = spans[first][0], spans[last][1]
        placed.append((index, start, end) if end > start else None)
    return PieceTiming(tuple(_fill(placed)), _visemes(symbols, spans))


def on_sound(timing: PieceTiming, loud: Sequence[bool] | Any, margin: int) -> PieceTiming:
    """Each word's edges moved inward onto its sound: the model's first and last phoneme
    of a word include the fade of the sound below the silence level (measured: a
    sentence's last word ended 20-100 ms after its last sample above 1 % of full scale).
    `loud[i]`: sample i is above the silence level. A word with no loud sample is kept."""
    words = []
    for index, start, end in timing.words:
        inside = _flat(loud[start:end])
        if len(inside):
            start, end = max(start, start + int(inside[0]) - margin), min(end, start + int(inside[-1]) + 1 + margin)
        words.append((index, start, end))
    return PieceTiming(tuple(words), timing.visemes)


def _flat(mask: Any) -> Any:
    import numpy as np  # the worker has it; the rest of this module needs only the stdlib

    return np.flatnonzero(mask)


def _mark(symbol: str) -> bool:
    return unicodedata.category(symbol) == "Lm" or unicodedata.combining(symbol) > 0


def _groups(symbols: list[str]) -> list[int]:
    """The phoneme group (espeak's word) of each symbol: a gap or punctuation ends one."""
    out, current = [], 0
    for s in symbols:
        if s in _GAPS or unicodedata.category(s)[0] == "P":
            current += 1
        out.append(current)
    return out


def _owners(heard: list[str], groups: list[int], said: list[str], labels: list[int]) -> list[int | None]:
    """The word index of each heard phoneme letter, non-decreasing."""
    owner: list[int | None] = [None] * len(heard)
    matcher = difflib.SequenceMatcher(None, heard, said, autojunk=False)
    a0 = b0 = 0
    for a, b, size in matcher.get_matching_blocks():
        # The unmatched run heard[a0:a] against said[b0:b]: shared in order.
        if a > a0 and b > b0:
            for k in range(a - a0):
                owner[a0 + k] = labels[b0 + k * (b - b0) // (a - a0)]
        for k in range(size):
            owner[a + k] = labels[b + k]
        a0, b0 = a + size, b + size
    # Extra phonemes (no word said there): the word of their group, else the one before.
    for k in range(len(heard)):
        if owner[k] is None and k > 0 and groups[k - 1] == groups[k]:
            owner[k] = owner[k - 1]
    following: int | None = None
    for k in range(len(heard) - 1, -1, -1):
        if owner[k] is None:
            owner[k] = following if following is not None else (owner[k - 1] if k else None)
        following = owner[k]
    highest = -1
    for k, value in enumerate(owner):  # order cannot go back (a match far off would)
        if value is not None:
            highest = max(highest, value)
            owner[k] = highest
    return owner


def _fill(placed: list[tuple[int, int, int] | None]) -> list[tuple[int, int, int]]:
    """Every word once, in order: a word without phonemes takes the gap before the next
    word, or the second half of the previous word."""
    out: list[tuple[int, int, int]] = []
    for k, item in enumerate(placed):
        if item is not None:
            if out and item[1] < out[-1][2]:
                item = (item[0], out[-1][2], max(item[2], out[-1][2] + 1))
            out.append(item)
            continue
        after = next((p[1] for p in placed[k + 1 :] if p is not None), None)
        before = out[-1][2] if out else 0
        if after is not None and after > before:
            out.append((k, before, after))
        elif out and out[-1][2] - out[-1][1] >= 2:
            index, start, end = out[-1]
            middle = (start + end) // 2
            out[-1] = (index, start, middle)
            out.append((k, middle, end))
        else:
            out.append((k, before, before + 1))
    return out


def _visemes(symbols: list[str], spans: list[tuple[int, int]]) -> tuple[tuple[str, int, int], ...]:
    out: list[tuple[str, int, int]] = []
    for shape, (start, end) in zip(phoneme_visemes(symbols), spans, strict=True):
        if end <= start:
            continue
        if out and out[-1][0] == shape and out[-1][2] == start:
            out[-1] = (shape, out[-1][1], end)
        else:
            out.append((shape, start, end))
    return tuple(out)
