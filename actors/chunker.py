"""Chunker: cuts each utterance's PCM into chunks numbered by the daemon's global chunk
counter, marks the last one isFinal, and announces the utterance around its chunks.

Reads Speech from the router; sends Frames, UtteranceStarted/UtteranceFinished and the
router's events (in their original order) to the broadcaster.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from pipeline import protocol
from pipeline.audio import ms_to_bytes, pcm_ms
from pipeline.config import Settings
from pipeline.flow import (
    Audio,
    Event,
    Frame,
    Outgoing,
    Shutdown,
    Speech,
    UtteranceBegin,
    UtteranceEnd,
    UtteranceFinished,
    UtteranceStarted,
)


class ChunkCounter:
    """The daemon-wide chunk id: +1 per chunk, wrapping at 2^32."""

    def __init__(self, start: int = 0) -> None:
        self._next = start & 0xFFFFFFFF

    def take(self) -> int:
        chunk_id = self._next
        self._next = (self._next + 1) & 0xFFFFFFFF
        return chunk_id


@dataclass
class _Open:
    """The utterance being chunked."""

    begin: UtteranceBegin
    buffer: bytearray = field(default_factory=bytearray)
    chunks: int = 0
    sent_bytes: int = 0
    first_chunk_id: int | None = None
    last_chunk_id: int | None = None


class Chunker:
    """The chunking actor.

    Chunk sizes grow: the first chunks are `first_chunks_ms` long (40, 80, 160 ms by
    default), the rest `chunk_ms`, so the size never holds back the first audio. The
    newest chunk is held until more audio or the end arrives, so that exactly one chunk
    (the last) is isFinal and none is empty. A cancelled utterance drops what is held.
    """

    def __init__(
        self,
        settings: Settings,
        speech: trio.MemoryReceiveChannel[Speech],
        out: trio.MemorySendChannel[Outgoing],
        counter: ChunkCounter | None = None,
    ) -> None:
        self.sample_rate = settings.sample_rate
        self.steps = [ms_to_bytes(ms, self.sample_rate) for ms in settings.first_chunks_ms]
        self.chunk_bytes = ms_to_bytes(settings.chunk_ms, self.sample_rate)
        self.speech = speech
        self.out = out
        self.counter = counter or ChunkCounter()
        self.open: _Open | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.out, self.speech:
            task_status.started()
            async for item in self.speech:
                match item:
                    case UtteranceBegin():
                        self.open = _Open(item)
                    case Audio(pcm=pcm) if self.open is not None:
                        self.open.buffer += pcm
                        await self._send_ready_chunks(self.open)
                    case UtteranceEnd():
                        await self._finish(item)
                    case Event() | Shutdown():
                        await self.out.send(item)

    def _target(self, state: _Open) -> int:
        return self.steps[state.chunks] if state.chunks < len(self.steps) else self.chunk_bytes

    async def _send_ready_chunks(self, state: _Open) -> None:
        # Strictly more than one chunk's worth: the held remainder is never empty.
        while len(state.buffer) > self._target(state):
            size = self._target(state)
            pcm = bytes(state.buffer[:size])
            del state.buffer[:size]
            await self._send_chunk(state, pcm, is_final=False)

    async def _send_chunk(self, state: _Open, pcm: bytes, *, is_final: bool) -> None:
        chunk_id = self.counter.take()
        if state.first_chunk_id is None:
            state.first_chunk_id = chunk_id
            begin = state.begin
            await self.out.send(
                UtteranceStarted(
                    protocol.event(
                        "utterance_started",
                        utterance_id=begin.utterance_id,
                        provider=begin.provider.value,
                        voice=begin.voice,
                        sample_rate=self.sample_rate,
                        format="wav",  # the broadcaster puts each subscriber's own format here
                        first_chunk_id=chunk_id,
                    ),
                    received_at=begin.received_at,
                )
            )
        state.chunks += 1
        state.sent_bytes += len(pcm)
        state.last_chunk_id = chunk_id
        await self.out.send(Frame(state.begin.utterance_id, chunk_id, is_final, pcm))

    async def _finish(self, end: UtteranceEnd) -> None:
        state = self.open if self.open is not None and self.open.begin.utterance_id == end.utterance_id else None
        if state is not None:
            # Only its own end closes the open utterance: a queued one cancelled meanwhile
            # (cancel all, shutdown) ends while this one still streams.
            self.open = None
        status = end.status
        if state is not None:
            if state.buffer and status != "cancelled":
                await self._send_chunk(state, bytes(state.buffer), is_final=True)
            if state.chunks == 0 and status != "cancelled":
                status = "failed"
        elif status != "cancelled":
            status = "failed"
        audio_ms = round(pcm_ms(state.sent_bytes, self.sample_rate)) if state else 0
        rtf = round(end.synth_seconds / (audio_ms / 1000), 4) if audio_ms else None
        await self.out.send(
            UtteranceFinished(
                protocol.event(
                    "utterance_finished",
                    utterance_id=end.utterance_id,
                    status=status,
                    chunks=state.chunks if state else 0,
                    last_chunk_id=state.last_chunk_id if state else None,
                    audio_ms=audio_ms,
                    ttfa_ms=None,  # the broadcaster knows when the first chunk was written
                    rtf=rtf,
                ),
                rtf=rtf,
                # The provider whose audio was heard first (a fallback, when the chosen one
                # failed before any audio); the chosen one when nothing was heard.
                provider=state.begin.provider.value if state else end.provider,
            )
        )
