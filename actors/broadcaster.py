"""Broadcaster: delivers every event and audio frame, in order, to each WebSocket
subscriber through that subscriber's own bounded queue and sender task, so one slow or
dead client never stalls the others.

Reads Outgoing items (from the chunker, and Join/Leave/replies from intake) on one
channel, so a connection's Join always precedes anything addressed to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio
from trio_websocket import ConnectionClosed

from pipeline import protocol
from pipeline.audio import wav_bytes
from pipeline.config import Settings
from pipeline.flow import (
    Event,
    Frame,
    Join,
    Leave,
    Outgoing,
    SubscriberOptions,
    UtteranceFinished,
    UtteranceStarted,
)
from pipeline.commands import TTSProvider

log = structlog.get_logger()

# WebSocket close code for "try again later": used for subscribers that cannot keep up.
CLOSE_TOO_SLOW = 1013


@dataclass
class Subscriber:
    """One connection: its options, its outgoing queue (bounded in bytes) and sender."""

    conn_id: int
    connection: Any
    options: SubscriberOptions
    limit: int
    queue_send: trio.MemorySendChannel[str | bytes]
    queue_recv: trio.MemoryReceiveChannel[str | bytes]
    queued_bytes: int = 0
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    dropped: bool = False

    def push(self, data: str | bytes) -> bool:
        """Queue `data`; False when that would exceed the subscriber's byte limit."""
        if self.dropped:
            return True
        size = len(data)
        if self.queued_bytes + size > self.limit:
            return False
        self.queued_bytes += size
        self.queue_send.send_nowait(data)
        return True


class Broadcaster:
    """The fan-out actor.

    Resource handling: owns one sender task per subscriber (in its own nursery); on
    Leave the task is cancelled. Error handling: a subscriber whose queue would exceed
    `subscriber_queue_bytes` is closed with 1013 and logged as `subscriber.too_slow`;
    a connection error ends only that subscriber.
    """

    def __init__(self, settings: Settings, inbox: trio.MemoryReceiveChannel[Outgoing]) -> None:
        self.settings = settings
        self.inbox = inbox
        self.subscribers: dict[int, Subscriber] = {}
        # What new connections must be told, learned from the events passing through.
        self.session = "closed"
        self.provider = TTSProvider(settings.provider).value
        self.speaking: UtteranceStarted | None = None
        self.owners: dict[str, int] = {}
        self.first_audio_at: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.inbox, trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            async for item in self.inbox:
                self._dispatch(item)
            nursery.cancel_scope.cancel()

    # ------------------------------------------------------------ dispatch (never blocks)

    def _dispatch(self, item: Outgoing) -> None:
        match item:
            case Frame():
                self._frame(item)
            case UtteranceStarted():
                self.speaking = item
                owner = self.owners.get(item.payload["utterance_id"])
                per_format = {fmt: protocol.event_json({**item.payload, "format": fmt}) for fmt in ("wav", "pcm")}
                for sub in list(self.subscribers.values()):
                    if sub.options.subscribe or sub.conn_id == owner:
                        self._push(sub, per_format[sub.options.format])
            case UtteranceFinished():
                self._finished(item)
            case Event():
                self._event(item)
            case Join():
                self._join(item)
            case Leave():
                self._leave(item.conn_id, item.reason)

    def _event(self, item: Event) -> None:
        payload = item.payload
        kind = payload["type"]
        if kind == "ready":
            self.session, self.provider = "open", payload["provider"]
        elif kind == "provider_changed":
            self.provider = payload["provider"]
        elif kind == "closed":
            self.session = "closed"
        elif kind == "accepted" and item.to is not None:
            self.owners[payload["utterance_id"]] = item.to
        text = protocol.event_json(payload)
        if item.to is not None:
            if (sub := self.subscribers.get(item.to)) is not None:
                self._push(sub, text)
            return
        owner = self.owners.get(item.utterance_id) if item.utterance_id else None
        for sub in list(self.subscribers.values()):
            if sub.options.subscribe or sub.conn_id in (item.reply_to, owner):
                self._push(sub, text)

    def _frame(self, frame: Frame) -> None:
        if frame.utterance_id not in self.first_audio_at and self.speaking is not None:
            now = trio.current_time()
            self.first_audio_at[frame.utterance_id] = now
            ttfa_ms = round((now - self.speaking.received_at) * 1000, 1)
            log.info("utterance.first_audio", utterance_id=frame.utterance_id, ttfa_ms=ttfa_ms)
        for sub in list(self.subscribers.values()):
            if sub.options.subscribe:
                self._push(sub, self._encode(frame, sub.options))

    def _encode(self, frame: Frame, options: SubscriberOptions) -> bytes:
        """The frame's bytes for one (format, compress) variant, built once per chunk."""
        key = (options.format, options.compress)
        data = frame.variants.get(key)
        if data is None:
            audio = wav_bytes(frame.pcm, self.settings.sample_rate) if options.format == "wav" else frame.pcm
            data = protocol.encode_voice_frame(frame.chunk_id, frame.is_final, audio)
            if options.compress:
                data = protocol.compress_frame(data)
            frame.variants[key] = data
        return data

    def _finished(self, item: UtteranceFinished) -> None:
        payload = item.payload
        utt_id = payload["utterance_id"]
        started = self.speaking if self.speaking and self.speaking.payload["utterance_id"] == utt_id else None
        first_at = self.first_audio_at.pop(utt_id, None)
        if started is not None and first_at is not None:
            payload["ttfa_ms"] = round((first_at - started.received_at) * 1000, 1)
        if started is not None:
            self.speaking = None
        log.info(
            "utterance.finished",
            utterance_id=utt_id,
            status=payload["status"],
            provider=item.provider,
            chunks=payload["chunks"],
            audio_ms=payload["audio_ms"],
            ttfa_ms=payload["ttfa_ms"],
            rtf=item.rtf,
        )
        self._event(Event(payload, utterance_id=utt_id))
        self.owners.pop(utt_id, None)

    # ------------------------------------------------------------ subscribers

    def _join(self, join: Join) -> None:
        send, recv = trio.open_memory_channel[str | bytes](math.inf)
        sub = Subscriber(join.conn_id, join.connection, join.options, self.settings.subscriber_queue_bytes, send, recv)
        self.subscribers[join.conn_id] = sub
        log.info(
            "subscriber.connected",
            conn=join.conn_id,
            subscribe=join.options.subscribe,
            format=join.options.format,
            compress=join.options.compress,
            subscribers=len(self.subscribers),
        )
        self._push(sub, protocol.event_json(protocol.hello(self.session, self.provider)))
        if self.speaking is not None and sub.options.subscribe:
            self._push(sub, protocol.event_json({**self.speaking.payload, "format": sub.options.format}))
        assert self._nursery is not None
        self._nursery.start_soon(self._send_forever, sub)

    def _leave(self, conn_id: int, reason: str) -> None:
        sub = self.subscribers.pop(conn_id, None)
        if sub is None:
            return
        sub.scope.cancel()
        log.info("subscriber.disconnected", conn=conn_id, reason=reason, subscribers=len(self.subscribers))

    def _push(self, sub: Subscriber, data: str | bytes) -> None:
        if not sub.push(data):
            self._drop_slow(sub)

    def _drop_slow(self, sub: Subscriber) -> None:
        """Close a subscriber that cannot keep up; everyone else carries on."""
        sub.dropped = True
        log.warning("subscriber.too_slow", conn=sub.conn_id, queued_bytes=sub.queued_bytes, limit=sub.limit)
        # Whatever it is sending now may finish within close_timeout; then it is closed.
        sub.scope.deadline = min(sub.scope.deadline, trio.current_time() + self.settings.close_timeout)
        sub.queue_send.close()

    async def _send_forever(self, sub: Subscriber) -> None:
        with sub.scope:
            try:
                async for data in sub.queue_recv:
                    if sub.dropped:
                        break
                    await sub.connection.send_message(data)
                    sub.queued_bytes -= len(data)
            except ConnectionClosed:
                return
        if sub.dropped:
            reason = f"too slow: more than {sub.limit} bytes waiting"
            with trio.move_on_after(self.settings.close_timeout) as cleanup:
                cleanup.shield = True
                try:
                    await sub.connection.aclose(CLOSE_TOO_SLOW, reason)
                except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the stream is closed either way
