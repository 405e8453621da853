"""Intake: the WebSocket server. Accepts connections, reads their control messages,
validates them into commands for the router, and answers bad input with an `error`
to the sender only.

Sends Envelopes to the router, and Join/Leave plus its own error replies to the
broadcaster (which owns everything written to a connection).
"""

from __future__ import annotations

import itertools
import urllib.parse

import structlog
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from pipeline import protocol
from pipeline.config import Settings
from pipeline.errors import SpeechError
from pipeline.flow import Envelope, Event, Join, Leave, Outgoing, SubscriberOptions

log = structlog.get_logger()


class HandshakeError(Exception):
    """A connection request that is refused with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_options(path: str) -> SubscriberOptions:
    """Read `format`, `compress`, `subscribe` and `token` from the request path."""
    url = urllib.parse.urlsplit(path)
    if url.path not in ("", "/"):
        raise HandshakeError(404, f"no WebSocket endpoint at {url.path}; connect to /")
    query = dict(urllib.parse.parse_qsl(url.query))
    fmt = query.get("format", "wav")
    if fmt not in ("wav", "pcm"):
        raise HandshakeError(400, f"format must be wav or pcm, not {fmt[:20]!r}")
    flags = {}
    for name, default in (("compress", "0"), ("subscribe", "1")):
        value = query.get(name, default)
        if value not in ("0", "1"):
            raise HandshakeError(400, f"{name} must be 0 or 1, not {value[:20]!r}")
        flags[name] = value == "1"
    return SubscriberOptions(format=fmt, compress=flags["compress"], subscribe=flags["subscribe"], token=query.get("token"))


class Intake:
    """The command intake actor.

    Error handling: a message that is not a valid command gets an `error` with its code
    and changes nothing else; the connection stays open. A refused handshake gets an
    HTTP status with a short reason.
    """

    def __init__(
        self,
        settings: Settings,
        commands: trio.MemorySendChannel[Envelope],
        outbox: trio.MemorySendChannel[Outgoing],
    ) -> None:
        self.settings = settings
        self.commands = commands
        self.outbox = outbox
        self._ids = itertools.count(1)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.commands, self.outbox, trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: serve_websocket(
                    self._handle,
                    self.settings.host,
                    self.settings.port,
                    None,
                    max_message_size=self.settings.max_message_size,
                    connect_timeout=self.settings.close_timeout,
                    disconnect_timeout=self.settings.close_timeout,
                    task_status=task_status,
                )
            )
            task_status.started(server.port)

    async def _handle(self, request: WebSocketRequest) -> None:
        try:
            options = parse_options(request.path)
        except HandshakeError as e:
            log.info("subscriber.refused", status=e.status, reason=e.message)
            await request.reject(e.status, body=e.message.encode())
            return
        connection = await request.accept()
        conn_id = next(self._ids)
        await self.outbox.send(Join(conn_id, connection, options))
        reason = "closed by client"
        try:
            while True:
                message = await connection.get_message()
                await self._on_message(conn_id, message)
        except ConnectionClosed as e:
            if e.reason is not None and e.reason.code not in (1000, 1001, 1005):
                reason = f"closed with {e.reason.code} {e.reason.reason or ''}".strip()
        finally:
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await self.outbox.send(Leave(conn_id, reason))

    async def _on_message(self, conn_id: int, message: str | bytes) -> None:
        received_at = trio.current_time()
        if isinstance(message, bytes):
            await self._reply_error(conn_id, "binary_not_accepted", "binary frames are not accepted; send JSON text")
            return
        try:
            command = protocol.parse_client_message(message)
        except SpeechError as e:
            await self._reply_error(conn_id, e.code, e.message)
            return
        await self.commands.send(Envelope(conn_id, command, received_at))

    async def _reply_error(self, conn_id: int, code: str, message: str) -> None:
        log.info("command.rejected", code=code, conn=conn_id)
        await self.outbox.send(Event(protocol.error(code, message), to=conn_id))
