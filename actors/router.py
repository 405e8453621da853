"""Router: owns the session (Initialize/Close), the current provider (SetTTSProvider)
and the FIFO queue of utterances, and speaks them one at a time.

Reads Envelopes from intake; sends Speech (utterance audio and every event that must
stay in order with it) to the chunker. Replies go the same way, addressed to the sender.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

import structlog
import trio

from pipeline import protocol
from pipeline.commands import Cancel, Close, Initialize, SendMessage, SetTTSProvider, TTSProvider
from pipeline.config import Settings
from pipeline.errors import ProviderError
from pipeline.flow import Envelope, Event, Shutdown, Speech, UtteranceEnd
from pipeline.metrics import Metrics
from pipeline.piece_bounds import PieceBounds
from pipeline.providers.registry import ProviderSet
from pipeline.speaking import Speaker, Utterance

log = structlog.get_logger()


@dataclass(frozen=True)
class _CloseMark:
    """Queued by Close: when the speaker reaches it, everything before it has been spoken."""

    conn_id: int | None


class UtteranceQueue:
    """The FIFO of accepted utterances (and close and shutdown marks) waiting for the speaker."""

    def __init__(self) -> None:
        self._items: deque[Utterance | _CloseMark | Shutdown] = deque()
        self._arrived = trio.Event()

    def __len__(self) -> int:
        return sum(isinstance(i, Utterance) for i in self._items)

    def put(self, item: Utterance | _CloseMark | Shutdown) -> None:
        self._items.append(item)
        self._arrived.set()

    async def get(self) -> Utterance | _CloseMark | Shutdown:
        while not self._items:
            self._arrived = trio.Event()
            await self._arrived.wait()
        return self._items.popleft()

    def drop_utterances(self) -> list[Utterance]:
        """Remove every waiting utterance (marks stay) and return them."""
        dropped = [i for i in self._items if isinstance(i, Utterance)]
        self._items = deque(i for i in self._items if not isinstance(i, Utterance))
        return dropped


class Router:
    """The session actor.

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
    ) -> None:
        self.settings = settings
        self.providers = providers
        self.commands = commands
        self.speech = speech
        self.current = TTSProvider(settings.provider)
        self.session_open = False
        self.stopping = False  # the daemon is shutting down: nothing may (re)open the session
        self.queue = UtteranceQueue()
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
        self._ids = itertools.count(1)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.speech, self.commands, trio.open_nursery() as nursery:
            nursery.start_soon(self._speak_forever)
            await self._initialize(None)
            task_status.started()
            async for envelope in self.commands:
                await self._handle(envelope)
            nursery.cancel_scope.cancel()

    # ------------------------------------------------------------ commands

    async def _handle(self, envelope: Envelope | Shutdown) -> None:
        if isinstance(envelope, Shutdown):
            await self._shut_down(envelope)
            return
        command, conn = envelope.command, envelope.conn_id
        match command:
            case SendMessage():
                await self._accept(command, envelope)
            case Initialize():
                await self._initialize(conn)
            case SetTTSProvider(provider=name):
                if reason := self.providers.unavailable_reason(name):
                    await self._reject(conn, "provider_unavailable", reason)
                    return
                self.current = name
                log.info("provider.changed", provider=name.value)
                await self.speech.send(Event(protocol.event("provider_changed", provider=name.value), reply_to=conn))
            case Close():
                self.session_open = False
                self.queue.put(_CloseMark(conn))
            case Cancel(all=everything):
                await self._cancel(conn, everything)

    async def _accept(self, command: SendMessage, envelope: Envelope) -> None:
        conn = envelope.conn_id
        if not self.session_open:
            why = "the daemon is shutting down" if self.stopping else "the session is closed; send initialize first"
            await self._reject(conn, "not_initialized", why)
            return
        if command.provider is not None and (reason := self.providers.unavailable_reason(command.provider)):
            await self._reject(conn, "provider_unavailable", reason)
            return
        if len(self.queue) >= self.settings.max_pending:
            await self._reject(
                conn, "queue_full", f"{self.settings.max_pending} utterances are already waiting; try again later"
            )
            return
        utt = Utterance(
            id=f"u{next(self._ids)}",
            text=command.text,
            voice=command.voice,
            speed=command.speed,
            provider=command.provider,
            owner=conn,
            received_at=envelope.received_at,
        )
        position = len(self.queue)
        log.info("utterance.accepted", utterance_id=utt.id, chars=len(utt.text), position=position)
        await self.speech.send(Event(protocol.event("accepted", utterance_id=utt.id, position=position), to=conn))
        self.queue.put(utt)

    async def _initialize(self, conn: int | None) -> None:
        if self.stopping:
            await self._reject(conn, "not_initialized", "the daemon is shutting down")
            return
        self.session_open = True
        try:
            reason = self.providers.unavailable_reason(self.current)
            if reason:
                raise ProviderError(reason, code="provider_unavailable")
            await self.providers.get(self.current).check()
        except ProviderError as e:
            log.warning("provider.unavailable", provider=self.current.value, error=e.message)
            await self._reject(conn, "provider_unavailable", e.message)
            return
        log.info("session.ready", provider=self.current.value)
        await self.speech.send(Event(protocol.ready(self.current.value), reply_to=conn))

    async def _cancel(self, conn: int, everything: bool) -> None:
        ids = []
        if self.speaking is not None:
            utt, scope = self.speaking
            scope.cancel()
            ids.append(utt.id)
        if everything:
            ids += await self._cancel_waiting()
        await self.speech.send(Event(protocol.event("cancelled", utterance_ids=ids), to=conn))

    async def _cancel_waiting(self) -> list[str]:
        """Drop every queued utterance, each ending as `cancelled`; their ids."""
        dropped = [utt.id for utt in self.queue.drop_utterances()]
        for utt_id in dropped:
            await self.speech.send(UtteranceEnd(utt_id, "cancelled"))
        return dropped

    async def _shut_down(self, shutdown: Shutdown) -> None:
        """Accept nothing more, end every waiting utterance as `cancelled`, and give the
        speaking one `grace` seconds; the speaker passes `shutdown` on when it is done."""
        self.stopping = True
        self.session_open = False
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

    async def _reject(self, conn: int | None, code: str, message: str) -> None:
        log.info("command.rejected", code=code, conn=conn)
        if conn is not None:
            await self.speech.send(Event(protocol.error(code, message), to=conn))

    # ------------------------------------------------------------ speaking

    async def _speak_forever(self) -> None:
        """Speak the queue in order. At the shutdown mark, release the providers and pass
        the mark on; the command loop goes on answering late commands until the daemon
        cancels it."""
        while True:
            item = await self.queue.get()
            if isinstance(item, Shutdown):
                await self.providers.aclose()
                await self.speech.send(item)
                return
            if isinstance(item, _CloseMark):
                if not self.session_open:
                    await self.providers.aclose()
                log.info("session.closed")
                await self.speech.send(Event(protocol.event("closed"), reply_to=item.conn_id))
                continue
            await self._speak(item)

    async def _speak(self, utt: Utterance) -> None:
        with structlog.contextvars.bound_contextvars(utterance_id=utt.id):
            first = utt.provider or self.current
            started = trio.current_time()
            status = "cancelled"
            with trio.CancelScope() as scope:
                self.speaking = (utt, scope)
                status = await self.speaker.speak(utt, first, self.speech.send)
            self.speaking = None
            await self.speech.send(UtteranceEnd(utt.id, status, trio.current_time() - started, first.value))
