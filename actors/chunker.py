"""Chunker: cuts each utterance's PCM into chunks numbered by the daemon's global chunk
counter, marks the last one isFinal, and announces the utterance around its chunks.

Reads Speech from the router; sends Frames, UtteranceStarted/UtteranceFinished and the
router's events (in their original order) to the broadcaster.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from pipeline.audio import ms_to_bytes, pcm_ms
from pipeline.config import Settings
from pipeline.events import Status, UtteranceFinished, UtteranceStarted
from pipeline.flow import (
    Audio,
    Broadcast,
    FinishNotice,
    Frame,
    Outgoing,
    Reply,
    SessionStatus,
    Shutdown,
    Speech,
    StartNotice,
    TimingNotice,
    UtteranceBegin,
    UtteranceEnd,
)
from pipeline.timing import Timing
from pipeline.timing_queue import HeldTiming


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
    timing: HeldTiming | None = None  # words/visemes waiting for the chunk they begin in


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
                    case Timing() if self.open is not None and self.open.begin.utterance_id == item.utterance_id:
                        if self.open.timing is None:
                            self.open.timing = HeldTiming(item.utterance_id, self.sample_rate)
                        self.open.timing.add(item)
                    case UtteranceEnd():
                        await self._finish(item)
                    case Reply() | Broadcast() | SessionStatus() | Shutdown():
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
            started = UtteranceStarted(begin.utterance_id, begin.provider.value, begin.voice, self.sample_rate, chunk_id)
            await self.out.send(StartNotice(started, begin.owner, begin.received_at))
        if state.timing is not None:
            for event in state.timing.due((state.sent_bytes + len(pcm)) // 2):
                await self.out.send(TimingNotice(event))
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
        if state is not None and state.buffer and status is not Status.CANCELLED:
            await self._send_chunk(state, bytes(state.buffer), is_final=True)
        if status is not Status.CANCELLED and (state is None or state.chunks == 0):
            status = Status.FAILED  # whatever the speaker thought, nothing was heard
        audio_ms = round(pcm_ms(state.sent_bytes, self.sample_rate)) if state else 0
        rtf = round(end.synth_seconds / (audio_ms / 1000), 4) if audio_ms else None
        finished = UtteranceFinished(
            end.utterance_id,
            status,
            chunks=state.chunks if state else 0,
            last_chunk_id=state.last_chunk_id if state else None,
            audio_ms=audio_ms,
            ttfa_ms=None,  # the broadcaster knows when the first chunk was written
            rtf=rtf,
        )
        # The provider whose audio was heard first (a fallback, when the chosen one failed
        # before any audio); the chosen one when nothing was heard.
        provider = state.begin.provider if state else end.provider
        await self.out.send(FinishNotice(finished, end.owner, provider.value))
