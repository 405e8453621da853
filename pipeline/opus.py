"""Opus for `format=opus` subscribers (DESIGN.md section 12): one libopus encoder per
utterance (through PyAV), whose 20 ms packets become the VOICE_DATA payload, and the
decoding side that clients (the CLI, tests, benchmarks) use.

Sits beside the broadcaster: it feeds each chunk's PCM to the utterance's encoder and
sends the packets that chunk completed to every opus subscriber. The payload of a chunk
is its packets, each as `u16 LE length` + packet bytes.

Timing: libopus encodes 20 ms at 24 kHz in ~0.4 ms of CPU (complexity 10, this class of
machine), so a 200 ms chunk costs ~4 ms (`python -m bench opus`): more than the
event loop may be held, so `encode_chunk` runs it in a worker thread.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable
from typing import Final

import av
import numpy as np
import soxr
import structlog
import trio
import trio.testing

from pipeline import protocol
from pipeline.flow import Frame

log = structlog.get_logger()

# The input rates libopus accepts; any other daemon rate is resampled to 48 kHz first.
OPUS_RATES: Final = frozenset({8000, 12000, 16000, 24000, 48000})
# Opus decoders produce 48 kHz; RFC 7845 counts pre-skip at this rate.
DECODE_RATE: Final = 48000
FRAME_MS: Final = 20
# The key of Opus frames among a Frame's encoded variants (compress never applies to Opus).
OPUS_VARIANT: Final = ("opus", False)
_LENGTH: Final = struct.Struct("<H")
# OpusHead (RFC 7845 section 5.1): the pre-skip is the u16 at offset 10.
_PRE_SKIP_OFFSET: Final = 10


class OpusEncoder:
    """One utterance's encoder: the codec state carries across chunks and pieces.

    Feed each chunk's PCM (s16le mono at `sample_rate`) with `frames` + `encode_frame`
    (or `encode_chunk` from a trio task); after the last chunk, `flush` gives the packets
    that hold the encoder's look-ahead, so the last words are not cut.

    Resource handling: owns a libopus context, freed with the object.
    Error handling: av.error.FFmpegError from PyAV if libopus refuses a setting (the
    bitrate is validated by the settings, the rate by OPUS_RATES, so not in practice).
    """

    def __init__(self, sample_rate: int, bitrate: int) -> None:
        self.sample_rate = sample_rate
        self._rate = sample_rate if sample_rate in OPUS_RATES else DECODE_RATE
        self._resampler = None if self._rate == sample_rate else soxr.ResampleStream(sample_rate, self._rate, 1, dtype="int16")
        self._context = av.CodecContext.create("libopus", "w")
        self._context.sample_rate = self._rate
        self._context.layout = "mono"
        self._context.format = "s16"
        self._context.bit_rate = bitrate
        self._context.open()
        self._frame_bytes = self._rate * FRAME_MS // 1000 * 2
        self._held = bytearray()  # input short of a whole 20 ms frame, kept for the next chunk
        header = bytes(self._context.extradata or b"")
        # libopus reports its look-ahead at its own rate; OpusHead (and we) count at 48 kHz.
        self.pre_skip: int = int.from_bytes(header[_PRE_SKIP_OFFSET : _PRE_SKIP_OFFSET + 2], "little")

    def frames(self, pcm: bytes, *, final: bool = False) -> list[bytes]:
        """The whole 20 ms input frames that `pcm` completes (the rest is held for the
        next call); with `final`, the held rest too, as a last, shorter frame."""
        if self._resampler is not None:
            samples = np.frombuffer(pcm, dtype="<i2")
            pcm = self._resampler.resample_chunk(samples, last=final).astype("<i2").tobytes()
        self._held += pcm
        whole = len(self._held) - len(self._held) % self._frame_bytes
        out = [bytes(self._held[i : i + self._frame_bytes]) for i in range(0, whole, self._frame_bytes)]
        del self._held[:whole]
        if final and self._held:
            out.append(bytes(self._held))
            self._held.clear()
        return out

    def encode_frame(self, frame_pcm: bytes) -> list[bytes]:
        """The packets for one input frame (one, in practice: libopus does not hold frames)."""
        samples = np.frombuffer(frame_pcm, dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self._rate
        return [bytes(packet) for packet in self._context.encode(frame)]

    def flush(self) -> list[bytes]:
        """The packets still inside the encoder (its look-ahead, padded with silence)."""
        return [bytes(packet) for packet in self._context.encode(None)]

    def encode_now(self, pcm: bytes, *, final: bool = False) -> bytes:
        """A chunk's payload in one go (benchmarks, tests; the daemon uses encode_chunk)."""
        packets = [p for frame in self.frames(pcm, final=final) for p in self.encode_frame(frame)]
        return payload(packets + (self.flush() if final else []))


async def encode_chunk(encoder: OpusEncoder, pcm: bytes, *, final: bool) -> bytes:
    """A chunk's payload: the packets its audio completes (and, on the final chunk, the
    flushed rest), encoded in a worker thread so the event loop is not held at all
    (libopus runs with the GIL released: PyAV encodes `nogil`). The caller awaits it, so
    chunks stay in order.

    Under trio's MockClock (tests) a thread would let the clock jump ahead while libopus
    runs, so there the encoding stays on the loop, yielding after every 20 ms frame."""
    if not isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
        return await trio.to_thread.run_sync(functools.partial(encoder.encode_now, pcm, final=final))
    packets: list[bytes] = []
    for frame in encoder.frames(pcm, final=final):
        packets += encoder.encode_frame(frame)
        await trio.lowlevel.checkpoint()
    if final:
        packets += encoder.flush()
    return payload(packets)


def payload(packets: Iterable[bytes]) -> bytes:
    """Packets laid out as in a VOICE_DATA frame: each `u16 LE length` + bytes."""
    return b"".join(_LENGTH.pack(len(p)) + p for p in packets)


def split_payload(data: bytes) -> list[bytes]:
    """The packets of one opus VOICE_DATA payload.

    Error handling: ValueError if a length runs past the end of the payload.
    """
    packets, at = [], 0
    while at < len(data):
        if at + _LENGTH.size > len(data):
            raise ValueError(f"opus payload ends inside a packet length at byte {at}")
        (size,) = _LENGTH.unpack_from(data, at)
        at += _LENGTH.size
        if at + size > len(data):
            raise ValueError(f"opus packet of {size} bytes runs past the payload's end")
        packets.append(data[at : at + size])
        at += size
    return packets


def encoder_pre_skip(sample_rate: int, bitrate: int) -> int:
    """The pre-skip (at 48 kHz) every utterance's encoder will report: what
    `utterance_started` announces to opus subscribers."""
    return OpusEncoder(sample_rate, bitrate).pre_skip


class OpusDecoder:
    """One utterance's decoder for clients: packets in order in, PCM s16le mono at
    48 kHz out, the first `pre_skip` samples dropped (RFC 7845).

    Error handling: av.error.FFmpegError (an InvalidDataError) on a packet that is not Opus.
    """

    def __init__(self, pre_skip: int) -> None:
        self._context = av.CodecContext.create("libopus", "r")
        self._context.sample_rate = DECODE_RATE
        self._context.layout = "mono"
        self._to_skip = pre_skip

    def decode(self, packets: Iterable[bytes]) -> bytes:
        pcm = bytearray()
        for packet in packets:
            for frame in self._context.decode(av.Packet(packet)):
                samples = frame.to_ndarray().reshape(-1)
                if samples.dtype != np.int16:  # a float decoder: scale to s16
                    samples = np.clip(samples * 32768.0, -32768, 32767).astype(np.int16)
                pcm += samples.astype("<i2").tobytes()
        skip = min(self._to_skip * 2, len(pcm))
        self._to_skip -= skip // 2
        del pcm[:skip]
        return bytes(pcm)


def decode_utterance(payloads: Iterable[bytes], pre_skip: int, sample_rate: int) -> bytes:
    """Every chunk payload of one utterance, in order, to PCM s16le mono at `sample_rate`
    (the rate `utterance_started` announced)."""
    decoder = OpusDecoder(pre_skip)
    pcm = b"".join(decoder.decode(split_payload(data)) for data in payloads)
    if sample_rate == DECODE_RATE or not pcm:
        return pcm
    samples = soxr.resample(np.frombuffer(pcm, dtype="<i2"), DECODE_RATE, sample_rate)
    return np.asarray(samples).astype("<i2").tobytes()


class OpusTrack:
    """The opus variant of the utterance being spoken, for the broadcaster: one encoder
    per utterance, fed every chunk in order whether or not an opus subscriber listens, so
    that a first opus subscriber joining mid-utterance still gets packets from an encoder
    that saw the utterance from its first sample (it costs ~1 % of a core while speaking).

    A late joiner's decoder starts at a packet in the middle of the stream: Opus decoders
    take that (the first 20 ms may be slightly off while its state converges).
    """

    def __init__(self, sample_rate: int, bitrate: int) -> None:
        self.sample_rate = sample_rate
        self.bitrate = bitrate
        self.pre_skip = encoder_pre_skip(sample_rate, bitrate)
        self._utterance: str | None = None
        self._encoder: OpusEncoder | None = None

    async def encode(self, utterance_id: str, pcm: bytes, *, final: bool) -> bytes:
        """The payload of the utterance's next chunk (the final one carries the flush).

        Error handling: if libopus fails (not seen in practice), the chunk goes out with
        no packets, `opus.encode_failed` is logged and the next chunk starts a new encoder
        (a decoder takes that like a late joiner's stream); nothing else is affected.
        """
        if self._encoder is None or self._utterance != utterance_id:
            self._utterance, self._encoder = utterance_id, OpusEncoder(self.sample_rate, self.bitrate)
        try:
            data = await encode_chunk(self._encoder, pcm, final=final)
        except av.error.FFmpegError as e:
            log.error("opus.encode_failed", utterance_id=utterance_id, error=str(e))
            self._encoder, data = None, b""
        if final:
            self.end(utterance_id)
        return data

    async def voice_frame(self, frame: Frame) -> bytes:
        """`frame` as an opus subscriber gets it: VOICE_DATA around the chunk's packets."""
        payload = await self.encode(frame.utterance_id, frame.pcm, final=frame.is_final)
        return protocol.encode_voice_frame(frame.chunk_id, frame.is_final, payload)

    def end(self, utterance_id: str) -> None:
        """The utterance is over (finished or cancelled): its encoder goes."""
        if self._utterance == utterance_id:
            self._utterance, self._encoder = None, None
