"""The mouth shapes of DESIGN.md section 11: the Oculus/OVR set of 15 visemes, and the two
documented tables that lead to them — from the embedded voice's IPA phonemes (exact times,
pipeline/providers/piper_align.py) and from a word's letters (estimates for voices that give
no timings, pipeline/timing.py). docs/timing.md prints both tables.

Stress marks (ˈ ˌ) take the shape of the sound they precede; length marks and diacritics
(ː ʲ combining marks) the shape of the sound they follow; word gaps, punctuation and the
voice's start/end symbols are `sil` (the voice's pauses).
"""

from __future__ import annotations

import unicodedata
from typing import Final

VISEMES: Final = ("sil", "PP", "FF", "TH", "DD", "kk", "CH", "SS", "nn", "RR", "aa", "E", "I", "O", "U")

_GROUPS: Final[dict[str, str]] = {
    "PP": "pbmɓʙɱ",
    "FF": "fvɸβʋ",
    "TH": "θð",
    "DD": "tdɾʈɖɗʔ",
    # h is voiced with the mouth already in the next vowel's shape, half open: kk's shape.
    "kk": "kgɡqɢxɣχʁħhɦɠ",
    "CH": "ʃʒçʝɕʑ",
    "SS": "szʂʐ",
    "nn": "nlŋɲɳɴɫɭɬɮʎʟ",
    "RR": "rɹɻʀɺɽ",
    "aa": "aɑɐæʌɶ",
    "E": "eɛəɚɜɝɘɞ",
    "I": "iɪɨyʏjɥ",
    "O": "oɔɒɵøœɤ",
    "U": "uʊʉɯwɰ",
}
IPA_VISEME: Final[dict[str, str]] = {ch: viseme for viseme, chars in _GROUPS.items() for ch in chars}
STRESS_MARKS: Final = frozenset("ˈˌ")
# Marks that lengthen or colour the sound before them.
_TRAILING_MARKS: Final = frozenset("ːˑʲʷˠˤʰ̃")

# Letters to visemes, for words whose times are estimated: two-letter spellings first.
LETTER_PAIRS: Final[dict[str, str]] = {
    "th": "TH", "sh": "CH", "ch": "CH", "ph": "FF", "ng": "nn", "ck": "kk", "qu": "kk", "wh": "U",
    "oo": "U", "ee": "I", "ea": "I",
}  # fmt: skip
LETTERS: Final[dict[str, str]] = {
    **dict.fromkeys("bmp", "PP"), **dict.fromkeys("fv", "FF"), **dict.fromkeys("td", "DD"),
    **dict.fromkeys("kgcqxh", "kk"), "j": "CH", **dict.fromkeys("sz", "SS"), **dict.fromkeys("nl", "nn"),
    "r": "RR", "a": "aa", "e": "E", **dict.fromkeys("iy", "I"), "o": "O", **dict.fromkeys("uw", "U"),
    # A digit: the first shape of its English name (an estimate, like everything here).
    "0": "SS", "1": "U", "2": "DD", "3": "TH", "4": "FF", "5": "FF", "6": "SS", "7": "SS", "8": "E", "9": "nn",
}  # fmt: skip
# Anything else that is a letter (another script): an open mouth.
OTHER_LETTER: Final = "aa"


def phoneme_visemes(phonemes: list[str]) -> list[str]:
    """The viseme of each phoneme symbol (one code point each, as Piper gives them)."""
    out: list[str | None] = []
    for symbol in phonemes:
        if symbol in STRESS_MARKS:
            out.append(None)  # decided by the next sound
        elif symbol in _TRAILING_MARKS or unicodedata.combining(symbol):
            out.append(next((v for v in reversed(out) if v is not None), "sil"))
        else:
            out.append(IPA_VISEME.get(symbol, "sil"))
    following = "sil"
    for k in range(len(out) - 1, -1, -1):
        if out[k] is None:
            out[k] = following
        following = out[k] or following
    return [v or "sil" for v in out]


def letter_visemes(word: str) -> list[str]:
    """A word's visemes estimated from its letters (LETTER_PAIRS, then LETTERS; other
    letters OTHER_LETTER; punctuation and symbols nothing). Never empty: a word with no
    letter at all gets one open mouth."""
    text = unicodedata.normalize("NFKD", word.lower())
    out: list[str] = []
    k = 0
    while k < len(text):
        pair = text[k : k + 2]
        if pair in LETTER_PAIRS:
            out.append(LETTER_PAIRS[pair])
            k += 2
            continue
        ch = text[k]
        if ch in LETTERS:
            out.append(LETTERS[ch])
        elif ch.isalpha():
            out.append(OTHER_LETTER)
        k += 1
    return out or [OTHER_LETTER]
