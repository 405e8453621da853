"""Decoding the body of a speech answer into s16le mono at 24 kHz, fed in pieces split
anywhere: raw PCM passes through, a RIFF/WAVE body (Kokoros without streaming: 32-bit float
with 0xFFFFFFFF sizes, or a server that ignores response_format) is converted as it arrives.
Used by the OpenAI-compatible client (`openai_compat`).
"""

from __future__ import annotations

import struct
from typing import Final

import numpy as np

from pipeline.audio import Resampler
from pipeline.errors import ProviderFailed

SAMPLE_RATE: Final = 24000  # what the speech servers send as "pcm", and what we hand on
WAV_HEADER_LIMIT: Final = 1 << 20  # a WAV header chunk larger than this is not speech
# Answers that are certainly not PCM or WAV (we ask for "pcm"; some servers ignore it).
NOT_AUDIO_TYPES: Final = ("audio/mpeg", "audio/mp3", "audio/ogg", "audio/opus", "audio/aac",
                          "audio/flac", "audio/webm", "application/json", "text/")
NOT_PCM_MAGIC: Final = {b"ID3": "mp3", b"OggS": "ogg", b"fLaC": "flac"}
# (WAV format tag, bits per sample) -> numpy dtype and the factor to the s16 range.
WAV_ENCODINGS: Final = {(1, 16): ("<i2", 1.0), (1, 32): ("<i4", 1 / 65536),
                        (3, 32): ("<f4", 32767.0), (3, 64): ("<f8", 32767.0)}
WAVE_FORMAT_EXTENSIBLE: Final = 0xFFFE


def permanent_failure(message: str) -> ProviderFailed:
    """A failure that asking again cannot change (the server sends what it cannot help)."""
    error = ProviderFailed(message)
    error.retryable = False
    return error


class SpeechBodyDecoder:
    """Turns a speech answer's body, fed in pieces split anywhere, into s16le mono 24 kHz.

    Raw PCM passes through untouched (only a first piece too short to rule out a file
    header such as "RIFF" waits for more); a RIFF/WAVE body is parsed as it comes and
    converted, and read until EOF whatever its size fields say.

    Error handling: an answer that is mp3/ogg/flac/JSON/text, or a WAV encoding it cannot
    read, raises `ProviderFailed` saying so.
    """

    def __init__(self, label: str, content_type: str | None) -> None:
        self._label = label
        kind = (content_type or "").split(";")[0].strip().lower()
        if kind.startswith(NOT_AUDIO_TYPES):
            raise self._not_audio(kind)
        self._declared_pcm = kind in ("audio/pcm", "audio/l16", "audio/raw")
        self._mode = "sniff"  # then "pcm", or "wav-header" then "wav-data"
        self._buffer = bytearray()
        self._pos = 12  # WAV: where the next header chunk starts
        self._dtype = "<i2"
        self._scale = 1.0
        self._channels = 1
        self._frame = 2
        self._resampler: Resampler | None = None
        self._have_format = False

    def feed(self, data: bytes) -> bytes:
        if self._mode == "pcm":
            return data
        self._buffer += data
        if self._mode == "sniff":
            head = bytes(self._buffer[:12])
            magics = [b"RIFF"] if self._declared_pcm else [b"RIFF", *NOT_PCM_MAGIC]
            if any(len(head) < len(m) and m.startswith(head) for m in magics):
                return b""  # too short to tell yet
            if not self._declared_pcm:
                for magic, kind in NOT_PCM_MAGIC.items():
                    if head.startswith(magic):
                        raise self._not_audio(kind)
            if not head.startswith(b"RIFF"):
                self._mode = "pcm"
                out, self._buffer = bytes(self._buffer), bytearray()
                return out
            if len(head) < 12:
                return b""  # wait for "WAVE"
            if head[8:] != b"WAVE":
                raise self._not_audio("a RIFF file that is not WAVE")
            self._mode = "wav-header"
        if self._mode == "wav-header":
            self._read_wav_header()
        return self._convert() if self._mode == "wav-data" else b""

    def finish(self) -> bytes:
        """The rest at end of body; a WAV file whose audio never began has nothing."""
        if self._mode == "sniff":
            out, self._buffer = bytes(self._buffer), bytearray()
            return out
        if self._mode == "wav-header":
            raise permanent_failure(f"{self._label} answered a WAV file that ended before its audio began")
        if self._mode == "wav-data" and self._resampler is not None:
            return self._resampler.flush()
        return b""  # a partial last WAV frame is dropped: it cannot be converted

    def _read_wav_header(self) -> None:
        buf = self._buffer
        while len(buf) >= self._pos + 8:
            chunk_id, size = struct.unpack_from("<4sI", buf, self._pos)
            start = self._pos + 8
            if chunk_id == b"data":  # its size may be 0xFFFFFFFF: read until EOF instead
                if not self._have_format:
                    raise permanent_failure(f"{self._label} answered a WAV file with no format chunk")
                del buf[:start]
                self._mode = "wav-data"
                return
            if size > WAV_HEADER_LIMIT:
                raise permanent_failure(f"{self._label} answered a WAV file with a malformed header")
            end = start + size + (size & 1)  # chunks are padded to an even size
            if len(buf) < end:
                return
            if chunk_id == b"fmt ":
                self._read_fmt(bytes(buf[start:start + size]))
            self._pos = end

    def _read_fmt(self, chunk: bytes) -> None:
        if len(chunk) < 16:
            raise permanent_failure(f"{self._label} answered a WAV file with a malformed format chunk")
        tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", chunk)
        if tag == WAVE_FORMAT_EXTENSIBLE and len(chunk) >= 26:
            (tag,) = struct.unpack_from("<H", chunk, 24)  # first two bytes of the sub-format GUID
        if (tag, bits) not in WAV_ENCODINGS or channels < 1 or rate < 1:
            raise permanent_failure(f"{self._label} answered WAV audio in format {tag} with {bits}-bit samples, "
                                 "which speechcast cannot read; use a server that sends pcm")
        self._dtype, self._scale = WAV_ENCODINGS[(tag, bits)]
        self._channels = channels
        self._frame = channels * bits // 8
        self._resampler = Resampler(rate, SAMPLE_RATE) if rate != SAMPLE_RATE else None
        self._have_format = True

    def _convert(self) -> bytes:
        whole = len(self._buffer) - len(self._buffer) % self._frame
        if not whole:
            return b""
        samples = np.frombuffer(bytes(self._buffer[:whole]), dtype=self._dtype)
        del self._buffer[:whole]
        values = samples.astype(np.float64).reshape(-1, self._channels).mean(axis=1)
        if samples.dtype.kind == "f":  # float audio is clipped to its full scale, ±1.0
            values = np.clip(np.nan_to_num(values), -1.0, 1.0)
        values *= self._scale
        pcm = np.clip(np.rint(values), -32768, 32767).astype("<i2").tobytes()
        return self._resampler.feed(pcm) if self._resampler is not None else pcm

    def _not_audio(self, kind: str) -> ProviderFailed:
        return permanent_failure(f"{self._label} answered {kind} instead of raw PCM or WAV audio; it ignored "
                              'response_format "pcm": use a server that can send pcm')
