"""PCM helpers: WAV chunk encoding, sample alignment and resampling to the output rate.

The router uses `SampleAligner` and `Resampler` on provider output; the broadcaster
uses `wav_bytes` to make every chunk a complete, self-contained WAV file.
"""

from __future__ import annotations

import io
import struct
import wave

import numpy as np
import soxr

BYTES_PER_SAMPLE = 2  # s16le mono


def wav_bytes(pcm: bytes, sample_rate: int) -> bytes:
    """A complete WAV file (PCM s16le mono) with exact size fields."""
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", 36 + len(pcm), b"WAVE",
        b"fmt ", 16, 1, 1, sample_rate, sample_rate * BYTES_PER_SAMPLE, BYTES_PER_SAMPLE, 16,
        b"data", len(pcm),
    )
    return header + pcm


def read_wav(data: bytes) -> tuple[int, bytes]:
    """(sample_rate, PCM) of a s16le mono WAV file; ValueError if it is anything else."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            if w.getnchannels() != 1 or w.getsampwidth() != BYTES_PER_SAMPLE:
                raise ValueError("expected 16-bit mono WAV")
            return w.getframerate(), w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        raise ValueError(f"not a WAV file: {e}") from None


def pcm_ms(n_bytes: int, sample_rate: int) -> float:
    return n_bytes / BYTES_PER_SAMPLE / sample_rate * 1000


def ms_to_bytes(ms: float, sample_rate: int) -> int:
    """Whole samples in `ms` milliseconds, as a byte count (at least one sample)."""
    return max(1, round(ms * sample_rate / 1000)) * BYTES_PER_SAMPLE


class SampleAligner:
    """Joins byte pieces that may split a sample in two; `feed` returns whole samples."""

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, data: bytes) -> bytes:
        data = self._carry + data
        cut = len(data) - len(data) % BYTES_PER_SAMPLE
        self._carry = data[cut:]
        return data[:cut]

    @property
    def leftover(self) -> int:
        """Bytes of an unfinished sample (a stream that ends with one is malformed)."""
        return len(self._carry)


class Resampler:
    """Streaming s16le resampler from one rate to another (identity when they match)."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.in_rate, self.out_rate = in_rate, out_rate
        self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16") if in_rate != out_rate else None

    def feed(self, pcm: bytes, *, last: bool = False) -> bytes:
        if self._stream is None:
            return pcm
        samples = np.frombuffer(pcm, dtype="<i2")
        out: bytes = self._stream.resample_chunk(samples, last=last).astype("<i2").tobytes()
        return out

    def flush(self) -> bytes:
        """The samples still inside the filter; call once at the end of a stream."""
        return self.feed(b"", last=True) if self._stream is not None else b""
