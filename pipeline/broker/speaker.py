"""The speaker's side of the broker: one term of holding the lease. The router and the
chunker run as in a daemon alone, fed from the broker's command stream; what they produce
is published to the output stream (every daemon's broadcaster reads it, this one's too).

    speechcast:commands ─XREAD─► router ─► chunker ─► publisher ─fenced XADD─► speechcast:out

A term continues from where the last one stopped: the command cursor, the session and
provider, the chunk counter and the utterance numbers (the broker's state hash, or this
daemon's own ClusterView when the broker lost it), and it first ends every utterance its
predecessor accepted and did not finish: `partial` if some of it was heard, else `failed`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import structlog
import trio

from actors.broadcaster import encode_frame
from actors.chunker import ChunkCounter, Chunker
from actors.router import Router
from pipeline.audio import pcm_ms
from pipeline.broker import wire
from pipeline.broker.edge import RETRY_S, OutputReader
from pipeline.broker.items import CommandEntry, HttpAnswer, Queued, RequestKey
from pipeline.broker.lease import SpeakerLease
from pipeline.broker.link import (
    BLOCK_MS,
    COMMANDS_KEY,
    LEASE_KEY,
    OUT_KEY,
    OUT_MAXLEN,
    STATE_KEY,
    BrokerDown,
    BrokerLink,
)
from pipeline.broker.view import ClusterView
from pipeline.config import Settings
from pipeline.events import (
    ErrorCode,
    ErrorEvent,
    ServerEvent,
    Status,
    UtteranceFinished,
)
from pipeline.flow import (
    Broadcast,
    Envelope,
    FinishNotice,
    Frame,
    Outgoing,
    SessionStatus,
    Shutdown,
    Speech,
)
from pipeline.metrics import Metrics
from pipeline.opus import OPUS_VARIANT, OpusTrack
from pipeline.providers.registry import ProviderSet
from pipeline.speaking import Utterance

log = structlog.get_logger()

# The variants the speaker encodes once for every daemon: the compressed ones (zlib is the
# work worth doing once). The uncompressed ones are the PCM framed (a fixed header), which
# every broadcaster builds from the frame's PCM byte for byte the same.
SHIPPED_VARIANTS: Final = (("wav", True), ("pcm", True))
# A command older than this when a speaker reads it is dropped: its sender gave up waiting
# (an HTTP request after 30 s), and speaking it now would surprise everyone.
STALE_COMMAND_S: Final = 30.0
# An HTTP request's answers are relayed until it has had none for this long (a streamed
# text gets one per refused part; it ends by itself after stream_idle_end_s).
RELAY_IDLE_S: Final = 60.0
SPEECH_BUFFER: Final = 64
OUT_BUFFER: Final = 256


class SpeakerTerm:
    """One term: run it inside the lease's scope (cancelled when the lease is lost).

    Error handling: a broker error while publishing or reading commands is retried every
    RETRY_S (nothing is skipped); a write the broker refuses because the lease is
    another's ends the term at once.
    """

    def __init__(
        self,
        settings: Settings,
        providers: ProviderSet,
        metrics: Metrics,
        link: BrokerLink,
        lease: SpeakerLease,
        reader: OutputReader,
        view: ClusterView,
    ) -> None:
        self.settings = settings
        self._opus = OpusTrack(settings.sample_rate, settings.opus_bitrate)
        self.providers = providers
        self.metrics = metrics
        self.link = link
        self.lease = lease
        self.reader = reader
        self.view = view
        self.control: trio.MemorySendChannel[Envelope | Shutdown] | None = None  # the router's channel, for Shutdown
        self.last_published: bytes | None = None
        self.published_all = trio.Event()  # the publisher reached the Shutdown mark
        self._answers: dict[RequestKey, trio.MemorySendChannel[ServerEvent]] = {}
        self._nursery: trio.Nursery

    async def run(self) -> None:
        newest = await self._retrying(self.link.redis.xrevrange, OUT_KEY, count=1)
        if newest:
            await self.reader.reached(newest[0][0])  # the view holds everything published
        state = wire.read_state(await self._retrying(self.link.redis.hgetall, STATE_KEY))
        cursor = state.cursor
        last_chunk = state.chunk if state.chunk is not None else self.view.last_chunk_id
        last_utterance = max(state.utterance or 0, self.view.last_utterance)
        resume = state.status or self.view.status
        log.info(
            "speaker.took_over",
            daemon=self.link.daemon_id,
            unfinished=sorted(self.view.open),
            next_chunk_id=None if last_chunk is None else last_chunk + 1,
            session=resume.state if resume else None,
        )
        commands_send, commands_recv = trio.open_memory_channel[Envelope | Shutdown](0)
        speech_send, speech_recv = trio.open_memory_channel[Speech](SPEECH_BUFFER)
        out_send, out_recv = trio.open_memory_channel[Outgoing | HttpAnswer | Queued](OUT_BUFFER)
        self.control = commands_send.clone()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._publish, out_recv)
            self._out = out_send.clone()
            requeue = await self._end_predecessors(resume)
            counter = ChunkCounter(0 if last_chunk is None else last_chunk + 1)
            chunker = Chunker(self.settings, speech_recv, out_send, counter)
            await nursery.start(chunker.run)
            router = Router(
                self.settings,
                self.providers,
                commands_recv,
                speech_send,
                self.metrics,
                resume=resume,
                first_utterance=last_utterance + 1,
                requeue=requeue,
                on_queued=self._queued,
            )
            await nursery.start(router.run)
            nursery.start_soon(self._read_commands, commands_send, cursor)

    async def _end_predecessors(self, resume: SessionStatus | None) -> tuple[Utterance, ...]:
        """What becomes of every utterance accepted before this term and not finished: a
        whole text none of which was heard is spoken again, in its place in the queue
        (returned, for the router); any other ends now, `partial` if some of it was heard
        (the one that was speaking), else `failed` (a streamed text that never began)."""
        fallback = resume.provider.value if resume else self.settings.provider
        requeue = []
        for utt in list(self.view.open.values()):
            if utt.chunks == 0 and utt.text is not None:
                queued = utt.text
                log.info("utterance.requeued", utterance_id=utt.utterance_id)
                requeue.append(
                    Utterance(queued.utterance_id, queued.text, queued.voice, queued.speed, queued.provider,
                              queued.owner, queued.received_at)
                )
                continue
            status = Status.PARTIAL if utt.chunks else Status.FAILED
            why = "the daemon speaking it stopped" + (" midway" if utt.chunks else " before it was spoken")
            error = ErrorEvent(ErrorCode.PROVIDER_FAILED, why, utterance_id=utt.utterance_id, recovered=False)
            finished = UtteranceFinished(
                utt.utterance_id,
                status,
                chunks=utt.chunks,
                last_chunk_id=utt.last_chunk_id,
                audio_ms=round(pcm_ms(utt.audio_bytes, self.settings.sample_rate)),
                ttfa_ms=None,
                rtf=None,
            )
            log.warning("utterance.orphaned", utterance_id=utt.utterance_id, status=status, chunks=utt.chunks)
            await self._out.send(Broadcast(error, also_to=utt.owner))
            await self._out.send(FinishNotice(finished, utt.owner, utt.provider or fallback))
        return tuple(requeue)

    async def _queued(self, utt: Utterance) -> None:
        """The router queued a whole text: every daemon learns it, for a next speaker."""
        item = Queued(utt.id, utt.text, utt.voice, utt.speed, utt.provider, utt.owner, utt.received_at)
        await self._out.send(item)

    # ------------------------------------------------------------ commands in

    async def _read_commands(self, commands: trio.MemorySendChannel[Envelope | Shutdown], cursor: bytes) -> None:
        async with commands:
            while True:
                answer = await self._retrying(self.link.redis.xread, {COMMANDS_KEY: cursor}, count=100, block=BLOCK_MS)
                for _stream, entries in answer or ():
                    for entry_id, fields in entries:
                        cursor = entry_id
                        await self._command(commands, fields)
                        await self._write_state([b"cursor", entry_id])

    async def _command(self, commands: trio.MemorySendChannel[Envelope | Shutdown], fields: dict[bytes, bytes]) -> None:
        try:
            entry = wire.decode(fields)
        except wire.WireError as e:
            log.error("broker.unreadable", error=str(e))
            return
        if not isinstance(entry, CommandEntry):
            return
        age = trio.current_time() - entry.received_at
        if age > STALE_COMMAND_S:
            log.warning("command.stale", conn=entry.conn_id, age_s=round(age, 1))
            return
        answer = self._answer_channel(entry.answer_to)
        # (Unbuffered: the router has taken it when this returns, and only then does the
        # cursor move past it.)
        await commands.send(Envelope(entry.conn_id, entry.command, entry.received_at, answer=answer))

    def _answer_channel(self, key: RequestKey | None) -> trio.MemorySendChannel[ServerEvent] | None:
        """The router answers an HTTP request into a channel; a relay publishes what it
        puts there for the daemon holding the request."""
        if key is None:
            return None
        if (channel := self._answers.get(key)) is None:
            channel, answers = trio.open_memory_channel[ServerEvent](64)
            self._answers[key] = channel
            self._nursery.start_soon(self._relay, key, answers)
        return channel

    async def _relay(self, key: RequestKey, answers: trio.MemoryReceiveChannel[ServerEvent]) -> None:
        try:
            while True:
                with trio.move_on_after(RELAY_IDLE_S):
                    event = await answers.receive()
                    await self._out.send(HttpAnswer(key, event))
                    continue
                return
        finally:
            self._answers.pop(key, None)

    # ------------------------------------------------------------ output out

    async def _publish(self, items: trio.MemoryReceiveChannel[Outgoing | HttpAnswer | Queued]) -> None:
        async with items:
            async for item in items:
                if isinstance(item, Shutdown):
                    self.published_all.set()
                    return
                if isinstance(item, Frame):
                    encoded = {(fmt, z): encode_frame(item, fmt, z, self.settings.sample_rate) for fmt, z in SHIPPED_VARIANTS}
                    # Opus here too: one encoder per utterance, so every daemon sends the same packets.
                    encoded[OPUS_VARIANT] = await self._opus.voice_frame(item)
                    item = Frame(item.utterance_id, item.chunk_id, item.is_final, item.pcm, encoded)
                elif isinstance(item, FinishNotice):
                    self._opus.end(item.event.utterance_id)
                try:
                    entry = wire.encode(item)
                except wire.WireError as e:
                    # A kind nobody listed in wire.KINDS: loud in the log, never fatal.
                    log.error("broker.unshippable", kind=type(item).__name__, error=str(e))
                    continue
                fields = [x for pair in entry.items() for x in pair]
                entry_id = await self._write_state(wire.state_change(item), fields)
                if isinstance(entry_id, bytes):
                    self.last_published = entry_id

    async def _write_state(self, state: list[bytes | str], fields: list[bytes] | None = None) -> object:
        """Append `fields` to the output stream (if any) and set `state`, only while the
        lease is this daemon's; retried while the broker is unreachable."""
        fields = fields or []
        args = [self.link.daemon_id, OUT_MAXLEN, len(fields), *fields, *state]
        while True:
            try:
                result = await self.link.call(self.link.fenced_write, keys=[LEASE_KEY, OUT_KEY, STATE_KEY], args=args)
            except BrokerDown:
                await trio.sleep(RETRY_S)
                continue
            if result is None:
                self.lease.lose("the broker refused a write: the lease is another daemon's")
                await trio.sleep_forever()  # (cancelled with the term)
            return result

    async def _retrying(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn`'s answer from the broker, asked again every RETRY_S while it is unreachable."""
        while True:
            try:
                return await self.link.call(fn, *args, **kwargs)
            except BrokerDown:
                await trio.sleep(RETRY_S)
