"""Broadcaster: delivers every event and audio frame, in order, to each WebSocket
subscriber through that subscriber's own bounded queue and sender task, so one slow or
dead client never stalls the others.

Reads Outgoing items (from the chunker, and Join/Leave/replies from intake) on one
channel, so a connection's Join always precedes anything addressed to it.

Hot path: each message is framed once, and a subscriber with nothing queued gets those
bytes written straight to its socket, without a task switch (actors/subscriber_stream.py);
only what a socket cannot take at once goes through the queue and the sender task.

(Just over 300 lines: the fan-out fast path and the queue behind it share their
bookkeeping, and the per-subscriber rules read best next to both.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import structlog
import trio
from trio_websocket import ConnectionClosed

from actors.subscriber import Pending, Subscriber
from actors.subscriber_stream import message_frame
from pipeline import protocol
from pipeline.audio import wav_bytes
from pipeline.commands import TTSProvider
from pipeline.config import Settings
from pipeline.events import AudioFormat, Hello, UtteranceStarted, Words
from pipeline.flow import (
    Broadcast,
    FinishNotice,
    Frame,
    Join,
    Leave,
    Outgoing,
    Reply,
    SessionStatus,
    Shutdown,
    StartNotice,
    SubscriberOptions,
    TimingNotice,
)
from pipeline.metrics import Metrics
from pipeline.opus import OPUS_VARIANT, OpusTrack
from pipeline.session import SessionState

log = structlog.get_logger()

# WebSocket close code for "try again later": used for subscribers that cannot keep up.
CLOSE_TOO_SLOW = 1013
# WebSocket close code for "going away": every connection gets it when the daemon stops.
CLOSE_GOING_AWAY = 1001


@dataclass(frozen=True)
class StatusView:
    """The session as the router last published it (it may lag the router by the items
    still in the channels, never disagree with what subscribers were told), plus the
    number of listening subscribers. A snapshot: changing it changes nothing."""

    session: SessionState
    provider: TTSProvider
    subscribers: int


class Broadcaster:
    """The fan-out actor.

    Resource handling: owns one sender task per subscriber (in its own nursery); on
    Leave the task is cancelled. Error handling: a subscriber whose queue would exceed
    `subscriber_queue_bytes` is closed with 1013 and logged as `subscriber.too_slow`;
    a connection error ends only that subscriber. On Shutdown every subscriber gets what
    is queued for it, then a 1001 close.
    """

    def __init__(
        self, settings: Settings, inbox: trio.MemoryReceiveChannel[Outgoing], metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.inbox = inbox
        self.metrics = metrics or Metrics()
        self.subscribers: dict[int, Subscriber] = {}
        # What new connections must be told: the router's last SessionStatus, and the
        # utterance being spoken (a late joiner hears the rest of it).
        self.published = SessionStatus(SessionState.CLOSED, TTSProvider(settings.provider))
        self.speaking: StartNotice | None = None
        self.first_audio_at: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None
        self._wires: dict[str | bytes, bytes] = {}  # message -> its WebSocket frame, per item
        self._stopped: trio.Event | None = None  # from Shutdown: set once every connection is closed
        self._senders: set[int] = set()  # subscribers whose sender task still runs
        self.opus = OpusTrack(settings.sample_rate, settings.opus_bitrate)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.inbox, trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            async for item in self.inbox:
                self._dispatch(item)
                if isinstance(item, Frame):
                    # Once every other format is on its way (they never wait for Opus). Awaited
                    # before the next item, so each utterance's encoder sees every chunk in order.
                    self._opus_frame(await self._opus_bytes(item))
            nursery.cancel_scope.cancel()

    def status(self) -> StatusView:
        """What /readyz and /v1/info report: the session and provider seen so far."""
        listening = sum(sub.options.subscribe for sub in self.subscribers.values())
        return StatusView(self.published.state, self.published.provider, listening)

    # ------------------------------------------------------------ dispatch (never blocks)

    def _dispatch(self, item: Outgoing) -> None:
        self._wires.clear()  # wire bytes of the previous item's messages
        match item:
            case Frame():
                self._frame(item)
            case StartNotice():
                self._started(item)
            case FinishNotice():
                self._finished(item)
            case TimingNotice():
                self._timing(item)
            case Broadcast(event=event, also_to=also_to):
                self._broadcast(protocol.render(event), also_to)
            case Reply(to=to, event=event):
                if (sub := self.subscribers.get(to)) is not None:
                    self._push(sub, protocol.render(event))
            case SessionStatus():
                self.published = item
            case Join():
                self._join(item)
            case Leave():
                self._leave(item.conn_id, item.reason)
            case Shutdown():
                self._shut_down(item)

    def _broadcast(self, text: str, also_to: int | None) -> None:
        """To every subscriber, and to `also_to` even when it does not subscribe."""
        for sub in list(self.subscribers.values()):
            if sub.options.subscribe or sub.conn_id == also_to:
                self._push(sub, text)

    def _started(self, notice: StartNotice) -> None:
        self.speaking = notice
        per_format = {fmt: self._announcement(notice.event, fmt) for fmt in AudioFormat}
        for sub in list(self.subscribers.values()):
            if sub.options.subscribe or sub.conn_id == notice.owner:
                self._push(sub, per_format[AudioFormat(sub.options.format)])

    def _announcement(self, event: UtteranceStarted, fmt: AudioFormat) -> str:
        """utterance_started as a subscriber of format `fmt` gets it."""
        if fmt is AudioFormat.OPUS:
            event = dataclasses.replace(event, codec="opus", pre_skip=self.opus.pre_skip)
        return protocol.render(event, fmt)

    def _timing(self, notice: TimingNotice) -> None:
        """Words or visemes, rendered once, to the subscribers that asked for them."""
        kind = "words" if isinstance(notice.event, Words) else "visemes"
        text = protocol.render(notice.event)
        for sub in list(self.subscribers.values()):
            if sub.options.subscribe and sub.options.timing in (kind, "all"):
                self._push(sub, text)

    def _frame(self, frame: Frame) -> None:
        if frame.utterance_id not in self.first_audio_at and self.speaking is not None:
            now = trio.current_time()
            self.first_audio_at[frame.utterance_id] = now
            ttfa_ms = round((now - self.speaking.received_at) * 1000, 1)
            self.metrics.ttfa.observe(now - self.speaking.received_at)
            log.info("utterance.first_audio", utterance_id=frame.utterance_id, ttfa_ms=ttfa_ms)
        variants: dict[tuple[str, bool], bytes] = {}  # built once per chunk, shared by all
        for sub in list(self.subscribers.values()):
            if sub.options.subscribe and sub.options.format != AudioFormat.OPUS:
                key = (sub.options.format, sub.options.compress)
                if (data := variants.get(key)) is None:
                    data = variants[key] = self._encode(frame, sub.options)
                self._push(sub, data)

    async def _opus_bytes(self, frame: Frame) -> bytes:
        """The frame's Opus variant: made by the speaker when the frame came through the
        broker (every daemon then sends the same packets), else encoded here."""
        if frame.encoded is not None and (data := frame.encoded.get(OPUS_VARIANT)) is not None:
            return data
        return await self.opus.voice_frame(frame)

    def _opus_frame(self, data: bytes) -> None:
        """The frame to every opus subscriber: one variant (compress does not apply to Opus)."""
        self._wires.clear()
        for sub in list(self.subscribers.values()):
            if sub.options.subscribe and sub.options.format == AudioFormat.OPUS:
                self._push(sub, data)

    def _encode(self, frame: Frame, options: SubscriberOptions) -> bytes:
        """The frame's bytes for one (format, compress) variant (made by the speaker
        already when the frame came through the broker)."""
        if frame.encoded is not None and (data := frame.encoded.get((options.format, options.compress))) is not None:
            return data
        return encode_frame(frame, options.format, options.compress, self.settings.sample_rate)

    def _finished(self, notice: FinishNotice) -> None:
        finished = notice.event
        utt_id = finished.utterance_id
        started = self.speaking if self.speaking and self.speaking.event.utterance_id == utt_id else None
        first_at = self.first_audio_at.pop(utt_id, None)
        self.opus.end(utt_id)
        if started is not None:
            self.speaking = None
            if first_at is not None:
                finished = dataclasses.replace(finished, ttfa_ms=round((first_at - started.received_at) * 1000, 1))
        log.info(
            "utterance.finished",
            utterance_id=utt_id,
            status=finished.status,
            provider=notice.provider,
            chunks=finished.chunks,
            audio_ms=finished.audio_ms,
            ttfa_ms=finished.ttfa_ms,
            rtf=finished.rtf,
        )
        self.metrics.utterance_finished(notice.provider, finished.status)
        self._broadcast(protocol.render(finished), notice.owner)

    # ------------------------------------------------------------ subscribers

    def _join(self, join: Join) -> None:
        send, recv = trio.open_memory_channel[str | bytes | Pending](math.inf)
        sub = Subscriber(
            join.conn_id, join.connection, join.options, self.settings.subscriber_queue_bytes, send, recv, stream=join.stream
        )
        self.subscribers[join.conn_id] = sub
        self.metrics.subscribers.set(self.status().subscribers)
        log.info(
            "subscriber.connected",
            conn=join.conn_id,
            subscribe=join.options.subscribe,
            format=join.options.format,
            compress=join.options.compress,
            subscribers=len(self.subscribers),
        )
        self._push(sub, protocol.render(Hello(self.published.state, self.published.provider.value)))
        if self.speaking is not None and sub.options.subscribe:
            self._push(sub, self._announcement(self.speaking.event, AudioFormat(sub.options.format)))
        assert self._nursery is not None
        self._senders.add(sub.conn_id)
        self._nursery.start_soon(self._run_sender, sub)
        if self._stopped is not None:
            self._go_away(sub)  # accepted just before the daemon began to stop

    def _leave(self, conn_id: int, reason: str) -> None:
        sub = self.subscribers.pop(conn_id, None)
        if sub is None:
            return
        sub.scope.cancel()
        self.metrics.subscribers.set(self.status().subscribers)
        if sub.dropped:
            reason = "too slow"
        elif sub.going_away:
            reason = "daemon shutting down"
        log.info("subscriber.disconnected", conn=conn_id, reason=reason, subscribers=len(self.subscribers))
        self._check_stopped()

    def _push(self, sub: Subscriber, data: str | bytes) -> None:
        """Deliver one message: straight to the socket when it has room (framed once per
        item for all subscribers, actors/subscriber_stream.py), else through the queue."""
        if sub.stream is not None:
            if (wire := self._wires.get(data)) is None:
                wire = self._wires[data] = message_frame(data)
            if sub.write_through(wire):
                if isinstance(data, bytes):
                    self.metrics.chunk_sent(len(data))
                return
        if not sub.push(data):
            self._drop_slow(sub)

    def _shut_down(self, shutdown: Shutdown) -> None:
        """Everything before `shutdown` has been queued: let each subscriber receive its
        queue (within close_timeout), then close it with 1001. `shutdown.closed` is set once
        every connection is closed (at once when there is none)."""
        self._stopped = shutdown.closed
        for sub in list(self.subscribers.values()):
            self._go_away(sub)
        self._check_stopped()

    def _check_stopped(self) -> None:
        # Done when every connection has left and every close handshake is over.
        if self._stopped is not None and not self.subscribers and not self._senders:
            self._stopped.set()

    def _go_away(self, sub: Subscriber) -> None:
        sub.going_away = True
        self._wind_down(sub)

    def _wind_down(self, sub: Subscriber) -> None:
        """Take nothing more for `sub`; its sender finishes what it is writing (within
        close_timeout) and then closes the connection."""
        sub.scope.deadline = min(sub.scope.deadline, trio.current_time() + self.settings.close_timeout)
        sub.queue_send.close()

    def _drop_slow(self, sub: Subscriber) -> None:
        """Close a subscriber that cannot keep up; everyone else carries on."""
        sub.dropped = True
        log.warning("subscriber.too_slow", conn=sub.conn_id, queued_bytes=sub.queued_bytes, limit=sub.limit)
        self._wind_down(sub)

    async def _run_sender(self, sub: Subscriber) -> None:
        try:
            await self._send_forever(sub)
        finally:
            self._senders.discard(sub.conn_id)
            self._check_stopped()

    async def _send_forever(self, sub: Subscriber) -> None:
        with sub.scope:
            try:
                async for data in sub.queue_recv:
                    if sub.dropped:
                        break
                    if isinstance(data, Pending):
                        assert sub.stream is not None
                        await sub.stream.flush()
                        sub.queued_bytes -= data.size
                        continue
                    await sub.connection.send_message(data)
                    sub.queued_bytes -= len(data)
                    if isinstance(data, bytes):
                        self.metrics.chunk_sent(len(data))
            except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                return
        if sub.dropped:
            await self._close(sub, CLOSE_TOO_SLOW, f"too slow: more than {sub.limit} bytes waiting")
        elif sub.going_away:
            await self._close(sub, CLOSE_GOING_AWAY, "the daemon is shutting down")

    async def _close(self, sub: Subscriber, code: int, reason: str) -> None:
        """Close one connection, waiting at most close_timeout for the client's answer."""
        with trio.move_on_after(self.settings.close_timeout) as cleanup:
            cleanup.shield = True
            try:
                await sub.connection.aclose(code, reason)
            except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the stream is closed either way


def encode_frame(frame: Frame, fmt: str, compress: bool, sample_rate: int) -> bytes:
    """One VOICE_DATA variant of `frame`: its audio as a WAV file or raw PCM, compressed or not."""
    audio = wav_bytes(frame.pcm, sample_rate) if fmt == "wav" else frame.pcm
    data = protocol.encode_voice_frame(frame.chunk_id, frame.is_final, audio)
    return protocol.compress_frame(data) if compress else data
