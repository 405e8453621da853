"""Router: owns the session (Initialize/Close, the table of pipeline/session.py), the
current provider (SetTTSProvider) and the FIFO queue of utterances, and speaks them one
at a time.

Reads Envelopes from intake and the HTTP face; sends Speech (utterance audio, the
published SessionStatus and every event that must stay in order with them) to the
chunker. A WebSocket's answer goes the same way, addressed to it; an HTTP request's answer
goes into the channel its Envelope carries.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Awaitable, Callable

import structlog
import trio

from actors.streams import OpenStreams
from pipeline.commands import (
    Cancel,
    Close,
    Disconnected,
    Initialize,
    SendMessage,
    SetTTSProvider,
    TextAppend,
    TextEnd,
    TextStart,
    TTSProvider,
)
from pipeline.config import Settings
from pipeline.errors import ProviderError
from pipeline.events import (
    Accepted,
    Cancelled,
    Closed,
    ErrorCode,
    ErrorEvent,
    ProviderChanged,
    Ready,
    ServerEvent,
    Status,
)
from pipeline.flow import (
    Broadcast,
    Envelope,
    Reply,
    SessionStatus,
    Shutdown,
    Speech,
    UtteranceEnd,
)
from pipeline.metrics import Metrics
from pipeline.piece_bounds import PieceBounds
from pipeline.providers.registry import ProviderSet
from pipeline.session import ACCEPTING, SessionInput, SessionState, transition
from pipeline.speaking import Speaker, Utterance
from pipeline.streaming import StreamTooLong, TextStream
from pipeline.utterance_queue import CloseMark, UtteranceQueue

log = structlog.get_logger()


class Router:
    """The session actor: the only owner of the session state (pipeline/session.py) and
    of the current provider; it publishes both as a SessionStatus after every change.

    Error handling: a provider that fails to load or check answers the asker with
    `provider_unavailable` and leaves the session usable; an utterance whose providers
    all fail ends with status `failed`. Nothing accepted is dropped without an
    `utterance_finished`.
    """

    def __init__(
        self,
        settings: Settings,
        providers: ProviderSet,
        commands: trio.MemoryReceiveChannel[Envelope | Shutdown],
        speech: trio.MemorySendChannel[Speech],
        metrics: Metrics | None = None,
        *,
        resume: SessionStatus | None = None,
        first_utterance: int = 1,
        requeue: tuple[Utterance, ...] = (),
        on_queued: Callable[[Utterance], Awaitable[None]] | None = None,
    ) -> None:
        """For a daemon taking over as speaker (docs/scale-out.md): `resume`, the session
        and provider its predecessor published, kept instead of opening a fresh session;
        `first_utterance`, the number after the last utterance id handed out; `requeue`,
        utterances its predecessor accepted and never began, queued first; `on_queued`,
        told of each whole text accepted, before its sender is answered."""
        self.settings = settings
        self.providers = providers
        self.commands = commands
        self.speech = speech
        self.current = resume.provider if resume else TTSProvider(settings.provider)
        self.session = SessionState.CLOSED  # until the daemon initializes itself in `run`
        self.resume = resume
        self.on_queued = on_queued
        self.stopping = False  # the daemon is shutting down: nothing may (re)open the session
        self.queue = UtteranceQueue()
        for utt in requeue:
            self.queue.put(utt)
        self.speaking: tuple[Utterance, trio.CancelScope] | None = None
        self.speaker = Speaker(
            providers,
            sample_rate=settings.sample_rate,
            fallback=settings.fallback,
            lookahead=settings.lookahead,
            short_first_piece=settings.short_first_piece,
            metrics=metrics,
            bounds=PieceBounds.from_settings(settings),
        )
        self._ids = itertools.count(first_utterance)
        # A provider check (start-up, Initialize) gets as long as an HTTP provider's own
        # health check may take; the embedded voice's workers load well within it.
        self.check_timeout = settings.connect_timeout + settings.first_byte_timeout
        self._check_waiters: list[Envelope | None] = []  # Initializes waiting for the check
        self._nursery: trio.Nursery
        self.streams: OpenStreams

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.speech, self.commands, trio.open_nursery() as nursery:
            self._nursery = nursery
            self.streams = OpenStreams(self.settings, nursery)
            nursery.start_soon(self._speak_forever)
            # The daemon initializes itself, but listens at once: the provider is checked
            # in the background and /readyz says "not ready" until it is up. A session its
            # predecessor had closed stays closed (a closing one lost its queue: closed).
            if self.resume is None or self.resume.state is SessionState.OPEN:
                await self._initialize(None)
            else:
                await self._publish()
            task_status.started()
            async for envelope in self.commands:
                await self._handle(envelope)
            nursery.cancel_scope.cancel()

    # ------------------------------------------------------------ commands

    async def _handle(self, envelope: Envelope | Shutdown) -> None:
        if isinstance(envelope, Shutdown):
            await self._shut_down(envelope)
            return
        command, asker = envelope.command, envelope
        match command:
            case SendMessage() | TextStart():
                await self._accept(command, asker)
            case TextAppend(utterance_id=utt_id, text=text, flush=flush):
                if (stream := await self._open_stream(asker, utt_id)) is not None:
                    await self._feed(asker, stream, text, flush=flush)
            case TextEnd(utterance_id=utt_id, text=text):
                if (stream := await self._open_stream(asker, utt_id)) is not None:
                    if text and not await self._feed(asker, stream, text):
                        return  # refused whole (too long): the stream stays open
                    self.streams.end(utt_id)
            case Disconnected():
                self.streams.end_all(owner=asker.conn_id)
            case Initialize():
                await self._initialize(asker)
            case SetTTSProvider(provider=name):
                if reason := self.providers.unavailable_reason(name):
                    await self._reject(asker, ErrorCode.PROVIDER_UNAVAILABLE, reason)
                    return
                self.current = name
                log.info("provider.changed", provider=name.value)
                # Checked in the background only so that /readyz knows how it is doing.
                self._nursery.start_soon(self._check_quietly, name)
                await self._publish()
                await self._announce(asker, ProviderChanged(name.value))
            case Close():
                if self.stopping:
                    await self._reject(asker, ErrorCode.NOT_INITIALIZED, "the daemon is shutting down")
                    return
                await self._move(SessionInput.CLOSE)
                self.queue.put(CloseMark(asker))
            case Cancel(all=everything):
                await self._cancel(asker, everything)

    async def _accept(self, command: SendMessage | TextStart, asker: Envelope) -> None:
        if self.stopping or self.session not in ACCEPTING:
            why = "the daemon is shutting down" if self.stopping else f"the session is {self.session}; send initialize first"
            await self._reject(asker, ErrorCode.NOT_INITIALIZED, why)
            return
        if command.provider is not None and (reason := self.providers.unavailable_reason(command.provider)):
            await self._reject(asker, ErrorCode.PROVIDER_UNAVAILABLE, reason)
            return
        chosen = self.providers.get(command.provider or self.current)
        if reason := chosen.unknown_voice_reason(command.voice):
            await self._reject(asker, ErrorCode.INVALID_COMMAND, reason)
            return
        if len(self.queue) >= self.settings.max_pending:
            await self._reject(
                asker, ErrorCode.QUEUE_FULL, f"{self.settings.max_pending} utterances are already waiting; try again later"
            )
            return
        streaming = isinstance(command, TextStart)
        if streaming and len(command.text) > self.settings.max_stream_chars:
            await self._reject(asker, ErrorCode.TEXT_TOO_LONG, f"more than {self.settings.max_stream_chars} characters (max_stream_chars)")
            return
        stream = None
        if streaming:
            stream = TextStream(
                short_first=self.settings.short_first_piece,
                max_chars=self.settings.max_stream_chars,
                now=asker.received_at,
            )
        utt = Utterance(
            id=f"u{next(self._ids)}",
            text="" if streaming else command.text,
            voice=command.voice,
            speed=command.speed,
            provider=command.provider,
            owner=asker.conn_id,
            received_at=asker.received_at,
            stream=stream,
        )
        position = len(self.queue)
        log.info("utterance.accepted", utterance_id=utt.id, chars=len(command.text), position=position, streaming=streaming)
        if stream is None and self.on_queued is not None:
            # Before the answer: whoever is told `accepted` can count on the text being
            # known to a next speaker (its record is published ahead of the answer).
            await self.on_queued(utt)
        await self._answer(asker, Accepted(utt.id, position, streaming=streaming))
        if stream is not None:
            self.streams.open(utt.id, asker.conn_id, stream)
            stream.append(command.text, now=asker.received_at)
        self.queue.put(utt)

    async def _open_stream(self, asker: Envelope, utt_id: str) -> TextStream | None:
        """The open stream `utt_id` of the asking connection, or None (answered
        `unknown_utterance`: never opened, ended, or another connection's)."""
        stream = self.streams.find(utt_id, asker.conn_id)
        if stream is None:
            await self._reject(
                asker, ErrorCode.UNKNOWN_UTTERANCE, f"no open streaming utterance {utt_id[:40]!r} of this connection"
            )
        return stream

    async def _feed(self, asker: Envelope, stream: TextStream, text: str, *, flush: bool = False) -> bool:
        """Append to a stream; False (answered `text_too_long`) past max_stream_chars."""
        try:
            stream.append(text, flush=flush, now=asker.received_at)
        except StreamTooLong as e:
            await self._reject(asker, ErrorCode.TEXT_TOO_LONG, str(e))
            return False
        return True

    async def _initialize(self, asker: Envelope | None) -> None:
        """Open the session now; check the current provider in its own task (never in
        this command loop, so cancel is served at once whatever the check does) and
        answer `ready` or `provider_unavailable` when the check ends. Initializes that
        arrive while a check runs share its answer."""
        if self.stopping:
            await self._reject(asker, ErrorCode.NOT_INITIALIZED, "the daemon is shutting down")
            return
        if self.session is SessionState.CLOSING:
            # The pending close is cancelled: each Close that waited is answered now,
            # before this Initialize's `ready`, and nothing closes afterwards.
            for mark in self.queue.drop_close_marks():
                await self._announce(mark.asker, Closed())
        await self._move(SessionInput.INITIALIZE)
        self._check_waiters.append(asker)
        if len(self._check_waiters) == 1:
            self._nursery.start_soon(self._check_current)

    async def _check_current(self) -> None:
        name = self.current
        try:
            await self.providers.check(name, self.check_timeout)
        except ProviderError as e:
            failure: str | None = e.message
        else:
            failure = None
        waiters, self._check_waiters = self._check_waiters, []
        if failure is not None:
            log.warning("provider.unavailable", provider=name.value, error=failure)
            for asker in waiters:
                await self._reject(asker, ErrorCode.PROVIDER_UNAVAILABLE, failure)
            return
        log.info("session.ready", provider=name.value)
        for asker in waiters:
            await self._announce(asker, Ready(name.value))

    async def _check_quietly(self, name: TTSProvider) -> None:
        with contextlib.suppress(ProviderError):
            await self.providers.check(name, self.check_timeout)

    async def _cancel(self, asker: Envelope, everything: bool) -> None:
        ids = []
        if self.speaking is not None:
            utt, scope = self.speaking
            scope.cancel()
            self.streams.end(utt.id)
            ids.append(utt.id)
        if everything:
            ids += await self._cancel_waiting()
        await self._answer(asker, Cancelled(tuple(ids)))

    async def _cancel_waiting(self) -> list[str]:
        """Drop every queued utterance, each ending as `cancelled`; their ids."""
        dropped = self.queue.drop_utterances()
        for utt in dropped:
            self.streams.end(utt.id)
            await self.speech.send(UtteranceEnd(utt.id, utt.owner, Status.CANCELLED, utt.provider or self.current))
        return [utt.id for utt in dropped]

    async def _shut_down(self, shutdown: Shutdown) -> None:
        """Accept nothing more, end every waiting utterance as `cancelled`, and give the
        speaking one `grace` seconds; the speaker passes `shutdown` on when it is done."""
        self.stopping = True
        self.streams.end_all()  # the speaking stream speaks what it has within the grace
        if self.speaking is not None:
            self.speaking[1].deadline = trio.current_time() + shutdown.grace
        cancelled = await self._cancel_waiting()
        self.queue.put(shutdown)
        log.info(
            "daemon.draining",
            speaking=self.speaking[0].id if self.speaking else None,
            cancelled=cancelled,
            grace_s=shutdown.grace,
        )

    async def _reject(self, asker: Envelope | None, code: ErrorCode, message: str) -> None:
        log.info("command.rejected", code=code, conn=asker.conn_id if asker else None)
        await self._answer(asker, ErrorEvent(code, message))

    async def _answer(self, asker: Envelope | None, event: ServerEvent) -> None:
        """Answer the command's sender only: a WebSocket through the broadcaster (in order
        with everything else it receives), an HTTP request through its own channel (None:
        the daemon itself asked, nobody to answer)."""
        if asker is None:
            return
        if asker.answer is not None:
            _hand_over(asker.answer, event)
        elif asker.conn_id is not None:
            await self.speech.send(Reply(asker.conn_id, event))

    async def _announce(self, asker: Envelope | None, event: ServerEvent) -> None:
        """Broadcast `event`; the sender gets that copy as its answer."""
        await self.speech.send(Broadcast(event, also_to=asker.conn_id if asker else None))
        if asker is not None and asker.answer is not None:
            _hand_over(asker.answer, event)

    async def _move(self, happened: SessionInput) -> None:
        """Apply the session table and publish the state it lands in."""
        self.session = transition(self.session, happened)
        await self._publish()

    async def _publish(self) -> None:
        await self.speech.send(SessionStatus(self.session, self.current))

    # ------------------------------------------------------------ speaking

    async def _speak_forever(self) -> None:
        """Speak the queue in order. At the shutdown mark, release the providers and pass
        the mark on; the command loop goes on answering late commands until the daemon
        cancels it."""
        while True:
            item = await self.queue.get()
            if isinstance(item, Shutdown):
                await self.providers.aclose()
                item.spoken.set()
                await self.speech.send(item)
                return
            if isinstance(item, CloseMark):
                await self._move(SessionInput.DRAINED)
                await self.providers.aclose()
                log.info("session.closed")
                await self._announce(item.asker, Closed())
                continue
            await self._speak(item)

    async def _speak(self, utt: Utterance) -> None:
        with structlog.contextvars.bound_contextvars(utterance_id=utt.id):
            first = utt.provider or self.current
            started = trio.current_time()
            status = Status.CANCELLED
            with trio.CancelScope() as scope:
                self.speaking = (utt, scope)
                status = await self.speaker.speak(utt, first, self.speech.send)
            self.speaking = None
            self.streams.end(utt.id)  # (a stream whose providers all failed is over too)
            await self.speech.send(UtteranceEnd(utt.id, utt.owner, status, first, trio.current_time() - started))


def _hand_over(answer: trio.MemorySendChannel[ServerEvent], event: ServerEvent) -> None:
    """Put the one answer of an HTTP command in its channel; a request that stopped
    waiting (its client left) is no loss."""
    with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        answer.send_nowait(event)
