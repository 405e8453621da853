"""Decoding the body of a speech answer into s16le mono at 24 kHz, fed in pieces split
anywhere: raw PCM passes through, a RIFF/WAVE body (Kokoros without streaming: 32-bit float
with 0xFFFFFFFF sizes, or a server that ignores response_format) is converted as it arrives.
Used by the OpenAI-compatible client (`openai_compat`).

What is refused (each ends the piece before any of its audio, so the fallback speaks it):
- a body that is text, not audio: by its content type (JSON, XML, `text/*`), or by its
  first bytes whatever the content type says (a proxy's HTML page or a JSON error sent
  as `audio/pcm`). `NotAudioBody` tells the caller, which reads the rest of the body for
  the server's own message.
- compressed audio (mp3, ogg, flac...), which we did not ask for and cannot decode.
- a WAV header that lies: a sample rate outside 8000–48000 Hz (a header claiming 1 Hz
  would turn 4.8 KB into 40 minutes of audio once resampled) or more than 8 channels.

Sniffing raw PCM for text is a bet, because PCM may start with any bytes. The bet taken:
a body whose first 32 bytes (after an optional UTF-8 BOM; the whole body if shorter) are
ALL printable ASCII (0x20–0x7E, tab, CR, LF) is text. For PCM that means its first 16
samples all lie between +8224 and +32382 AND each has a printable low byte: about one
chance in ten million even for loud audio, and speech answers begin near silence. The
price of a false positive is one piece spoken by the fallback voice.

A body that ends in the middle of a sample: the half sample is held back here (WAV) or by
the speaking loop (raw PCM) and dropped; it cannot be played, and the transport already
reports a body that broke off (`ProviderFailed`).
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
                          "audio/flac", "audio/webm")
# Content types of text answers: an error message or a web page, never audio.
TEXT_TYPES: Final = ("text/", "application/json", "application/xml", "application/xhtml+xml",
                     "application/problem+json")
TEXT_SNIFF_BYTES: Final = 32  # see the module docstring for why 32 printable bytes mean text
PRINTABLE: Final = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D}
UTF8_BOM: Final = b"\xef\xbb\xbf"
# Sample rates a speech answer may have; outside them the header lies (or is not speech).
WAV_RATES: Final = (8000, 48000)
WAV_MAX_CHANNELS: Final = 8
NOT_PCM_MAGIC: Final = {b"ID3": "mp3", b"OggS": "ogg", b"fLaC": "flac"}
# (WAV format tag, bits per sample) -> numpy dtype and the factor to the s16 range.
WAV_ENCODINGS: Final = {(1, 16): ("<i2", 1.0), (1, 32): ("<i4", 1 / 65536),
                        (3, 32): ("<f4", 32767.0), (3, 64): ("<f8", 32767.0)}
WAVE_FORMAT_EXTENSIBLE: Final = 0xFFFE


class NotAudioBody(Exception):
    """The answer is text (`kind`: "JSON", "an HTML page", "text" or its content type), not
    audio; `head` is what the decoder has read of it. The caller reads the rest of the
    body for the server's message and raises a `ProviderFailed`."""

    def __init__(self, kind: str, head: bytes) -> None:
        super().__init__(kind)
        self.kind = kind
        self.head = head


def sniff_text(head: bytes, *, at_end: bool) -> str | None | bool:
    """What the first bytes of a body say: the kind of text it is, None for audio, or
    False when too few bytes have arrived to tell (only while they are all printable)."""
    head = head.removeprefix(UTF8_BOM)[:TEXT_SNIFF_BYTES]
    if not head or not PRINTABLE.issuperset(head):
        return None
    if len(head) < TEXT_SNIFF_BYTES and not at_end:
        return False
    first = head.lstrip()[:1]
    return {b"{": "JSON", b"[": "JSON", b"<": "an HTML page"}.get(first, "text")


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

    Error handling: a text answer (JSON, HTML, plain text; by content type or by its
    first bytes) raises `NotAudioBody`; mp3/ogg/flac, a WAV encoding it cannot read or a
    WAV header with an impossible rate or channel count raise `ProviderFailed` saying so.
    """

    def __init__(self, label: str, content_type: str | None) -> None:
        self._label = label
        kind = (content_type or "").split(";")[0].strip().lower()
        if kind.startswith(TEXT_TYPES) or kind.endswith(("+json", "+xml")):
            raise NotAudioBody(kind, b"")
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
                verdict = sniff_text(bytes(self._buffer[:TEXT_SNIFF_BYTES + len(UTF8_BOM)]), at_end=False)
                if verdict is False:
                    return b""  # all printable so far: text or not, the next bytes tell
                if verdict:
                    raise NotAudioBody(str(verdict), bytes(self._buffer))
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
            if verdict := sniff_text(out, at_end=True):
                raise NotAudioBody(str(verdict), out)
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
        if (tag, bits) not in WAV_ENCODINGS:
            raise permanent_failure(f"{self._label} answered WAV audio in format {tag} with {bits}-bit samples, "
                                    "which speechcast cannot read; use a server that sends pcm")
        if not WAV_RATES[0] <= rate <= WAV_RATES[1]:
            raise permanent_failure(f"{self._label} answered a WAV header claiming {rate} Hz, outside the "
                                    f"{WAV_RATES[0]}–{WAV_RATES[1]} Hz of speech; the server or its answer is broken")
        if not 1 <= channels <= WAV_MAX_CHANNELS:
            raise permanent_failure(f"{self._label} answered a WAV header claiming {channels} channels; "
                                    "the server or its answer is broken")
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
