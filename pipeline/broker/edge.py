"""Every daemon's side of the broker: its commands go into the broker's command stream
for the speaker, and the speaker's output comes back from the output stream into its own
broadcaster (which fans it out locally, as a daemon alone does).

    intake / HTTP face ─Envelope─► CommandForwarder ─XADD─► speechcast:commands
    speechcast:out ─XREAD─► OutputReader ─Outgoing─► broadcaster
                                   └─ HttpAnswer ─► the HTTP request waiting here
"""

from __future__ import annotations

import collections
import contextlib
import itertools
from typing import Final

import structlog
import trio

from pipeline.broker import wire
from pipeline.broker.items import CommandEntry, HttpAnswer, Queued, RequestKey
from pipeline.broker.link import (
    BLOCK_MS,
    COMMANDS_KEY,
    COMMANDS_MAXLEN,
    OUT_KEY,
    STATE_KEY,
    BrokerDown,
    BrokerLink,
)
from pipeline.broker.view import ClusterView
from pipeline.events import ErrorCode, ErrorEvent, ServerEvent
from pipeline.flow import Envelope, Outgoing, Reply

log = structlog.get_logger()

# HTTP requests whose answers may still come (a streamed text's stays open the longest);
# past this many the oldest is forgotten (its client has long timed out).
MAX_WAITING_REQUESTS: Final = 4096
# How long a reader waits before asking a broker that failed again.
RETRY_S: Final = 0.2


def stream_id(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id ("ms-seq") as a comparable pair."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class CommandForwarder:
    """Puts this daemon's commands into the broker's command stream.

    Error handling: a command the broker does not take (it is gone) is answered
    `provider_unavailable` at once, to its WebSocket connection or HTTP request.
    """

    def __init__(self, link: BrokerLink, outbox: trio.MemorySendChannel[Outgoing], conn_id_base: int) -> None:
        self.link = link
        self.outbox = outbox
        self.conn_id_base = conn_id_base
        self._request_numbers = itertools.count(1)
        # id(answer channel) -> (its key, the channel): the channel is kept alive while
        # listed, so its id cannot be reused by another.
        self.waiting: collections.OrderedDict[int, tuple[RequestKey, trio.MemorySendChannel[ServerEvent]]] = (
            collections.OrderedDict()
        )
        self.by_key: dict[RequestKey, trio.MemorySendChannel[ServerEvent]] = {}

    async def forward(self, envelope: Envelope) -> None:
        entry = CommandEntry(self._global(envelope.conn_id), envelope.command, envelope.received_at, self._key(envelope))
        try:
            await self.link.call(
                self.link.redis.xadd, COMMANDS_KEY, wire.encode(entry), maxlen=COMMANDS_MAXLEN, approximate=True
            )
        except BrokerDown:
            await self._refuse(envelope)

    def _global(self, conn_id: int | None) -> int | None:
        # WebSocket ids are global already (intake counts from conn_id_base); an HTTP
        # stream's owner is a negative local number, made global here.
        if conn_id is not None and conn_id < 0:
            return -(self.conn_id_base - conn_id)
        return conn_id

    def _key(self, envelope: Envelope) -> RequestKey | None:
        if envelope.answer is None:
            return None
        if (known := self.waiting.get(id(envelope.answer))) is not None:
            return known[0]
        key = RequestKey(self.link.daemon_id, next(self._request_numbers))
        self.waiting[id(envelope.answer)] = (key, envelope.answer)
        self.by_key[key] = envelope.answer
        while len(self.waiting) > MAX_WAITING_REQUESTS:
            old_key, _ = self.waiting.popitem(last=False)[1]
            self.by_key.pop(old_key, None)
        return key

    def hand_over(self, answer: HttpAnswer) -> None:
        """An answer from the speaker for one of this daemon's HTTP requests."""
        channel = self.by_key.get(answer.to)
        if channel is None:
            return
        try:
            channel.send_nowait(answer.event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.by_key.pop(answer.to, None)
            self.waiting.pop(id(channel), None)
        except trio.WouldBlock:
            pass  # a request that stopped reading its answers

    async def _refuse(self, envelope: Envelope) -> None:
        reason = self.link.problem() or "the broker did not take the command"
        log.info("command.rejected", code=ErrorCode.PROVIDER_UNAVAILABLE, conn=envelope.conn_id)
        error = ErrorEvent(ErrorCode.PROVIDER_UNAVAILABLE, f"{reason}; try again later")
        if envelope.answer is not None:
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                envelope.answer.send_nowait(error)
        elif envelope.conn_id is not None:
            await self.outbox.send(Reply(envelope.conn_id, error))


class OutputReader:
    """Reads the speaker's output stream into this daemon's broadcaster, folding every
    item into the ClusterView on the way.

    Error handling: a broker error is retried every RETRY_S from the last entry read,
    so nothing published meanwhile is skipped; an entry that cannot be read is logged
    and skipped.
    """

    def __init__(
        self,
        link: BrokerLink,
        outbox: trio.MemorySendChannel[Outgoing],
        view: ClusterView,
        forwarder: CommandForwarder,
    ) -> None:
        self.link = link
        self.outbox = outbox
        self.view = view
        self.forwarder = forwarder
        self.last_id: bytes | None = None  # None until the broker first answers
        self._progress = trio.Event()  # set (and replaced) after each batch

    async def run(self) -> None:
        while True:
            try:
                if self.last_id is None:
                    await self._start()
                await self._read_batch()
            except BrokerDown:
                await trio.sleep(RETRY_S)

    async def _start(self) -> None:
        """First contact: read from the end of the stream on, and tell the broadcaster
        the session as the broker has it (the speaker publishes it again on changes)."""
        newest = await self.link.call(self.link.redis.xrevrange, OUT_KEY, count=1)
        state = await self.link.call(self.link.redis.hgetall, STATE_KEY)
        self.last_id = newest[0][0] if newest else b"0-0"
        if (status := wire.read_state(state).status) is not None:
            self.view.see(status)
            await self.outbox.send(status)

    async def _read_batch(self) -> None:
        assert self.last_id is not None
        answer = await self.link.call(self.link.redis.xread, {OUT_KEY: self.last_id}, count=200, block=BLOCK_MS)
        for _stream, entries in answer or ():
            for entry_id, fields in entries:
                self.last_id = entry_id
                try:
                    item = wire.decode(fields)
                except wire.WireError as e:
                    log.error("broker.unreadable", entry=entry_id.decode(), error=str(e))
                    continue
                self.view.see(item)
                if isinstance(item, HttpAnswer):
                    if item.to.daemon == self.link.daemon_id:
                        self.forwarder.hand_over(item)
                    continue
                if isinstance(item, Queued):
                    continue  # (for the view only: what a next speaker would speak)
                await self.outbox.send(item)  # type: ignore[arg-type]  # (wire.KINDS: Outgoing items)
        self._progress.set()
        self._progress = trio.Event()

    async def reached(self, entry_id: bytes) -> None:
        """Wait until every entry up to `entry_id` has been read and passed on."""
        while self.last_id is None or stream_id(self.last_id) < stream_id(entry_id):
            await self._progress.wait()
