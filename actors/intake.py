"""Intake: the WebSocket server. Accepts connections, reads their control messages,
validates them into commands for the router, and answers bad input with an `error`
to the sender only.

Sends Envelopes to the router, and Join/Leave plus its own error replies to the
broadcaster (which owns everything written to a connection).
"""

from __future__ import annotations

import contextlib
import itertools
import urllib.parse
from dataclasses import dataclass

import structlog
import trio
import wsproto
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from actors.subscriber_stream import SubscriberListener, SubscriberStream
from actors.websocket import StrictConnection, keep_alive
from pipeline import access, client_input
from pipeline.access import Grant, HandshakeError, TokenBucket
from pipeline.commands import Disconnected, TextAppend
from pipeline.config import Settings
from pipeline.errors import SpeechError
from pipeline.events import ErrorCode, ErrorEvent
from pipeline.flow import Envelope, Join, Leave, Outgoing, Reply, SubscriberOptions

log = structlog.get_logger()

# Close code for a peer that stopped answering pings (as the `websockets` library uses).
CLOSE_NO_PONG = 1011
# What a text_append costs of the rate limit, as a share of any other command's cost.
APPEND_COST = 0.1


@dataclass
class Peer:
    """One admitted connection as intake sees it: what it may do, its command budget,
    and why it ended when intake (not the client) ended it."""

    conn_id: int
    grant: Grant
    bucket: TokenBucket
    limited: bool = False  # inside a run of rate-limited messages (logged once per run)
    commanded: bool = False  # it sent the router a command (so it may have opened streams)
    ended_because: str | None = None


def parse_options(path: str) -> SubscriberOptions:
    """Read `format`, `compress`, `subscribe`, `timing` and `token` from the request path.

    Error handling: HandshakeError (404 another path, 400 a bad value); whatever the
    path holds, nothing else escapes (a parser's surprise is a 400 too).
    """
    try:
        return _options(path)
    except HandshakeError:
        raise
    except Exception as e:
        raise HandshakeError(400, f"the request path could not be read ({type(e).__name__})") from None


def _options(path: str) -> SubscriberOptions:
    url = urllib.parse.urlsplit(path)
    if url.path not in ("", "/"):
        raise HandshakeError(404, f"no WebSocket endpoint at {url.path}; connect to /")
    query = dict(urllib.parse.parse_qsl(url.query))
    fmt = query.get("format", "wav")
    if fmt not in ("wav", "pcm", "opus"):
        raise HandshakeError(400, f"format must be wav, pcm or opus, not {fmt[:20]!r}")
    flags = {}
    for name, default in (("compress", "0"), ("subscribe", "1")):
        value = query.get(name, default)
        if value not in ("0", "1"):
            raise HandshakeError(400, f"{name} must be 0 or 1, not {value[:20]!r}")
        flags[name] = value == "1"
    # compress=1 is accepted with opus and ignored: zlib gains nothing on Opus (DESIGN.md 12).
    compress = flags["compress"] and fmt != "opus"
    return SubscriberOptions(
        format=fmt, compress=compress, subscribe=flags["subscribe"], token=query.get("token"), timing=_timing_option(query)
    )


def _timing_option(query: dict[str, str]) -> str:
    """`timing=words|visemes|all` (DESIGN.md section 11); "" when absent or `none`."""
    value = query.get("timing", "none")
    if value not in ("none", "words", "visemes", "all"):
        raise HandshakeError(400, f"timing must be words, visemes, all or none, not {value[:20]!r}")
    return "" if value == "none" else value


class Intake:
    """The command intake actor.

    Error handling: a message that is not a valid command gets an `error` with its code
    and changes nothing else; the connection stays open. A refused handshake gets an
    HTTP status with a short reason: 400/404 bad options, 401 token, 403 origin, 503
    past `max_connections` (the rules live in pipeline/access.py). A client frame over
    `max_message_size` closes the connection with 1009 (trio-websocket does that); a
    peer that stops answering pings is closed with 1011; a protocol violation (bad
    framing, reserved bits or opcode: 1002; invalid UTF-8 in a text frame: 1007) is
    closed with its code (StrictConnection).
    """

    def __init__(
        self,
        settings: Settings,
        commands: trio.MemorySendChannel[Envelope],
        outbox: trio.MemorySendChannel[Outgoing],
        *,
        first_conn_id: int = 1,
    ) -> None:
        self.settings = settings
        self.commands = commands
        self.outbox = outbox
        self.accepting = True  # until the daemon's drain calls stop_accepting
        # (With a broker, each daemon counts from a base of its own: ids are global.)
        self._ids = itertools.count(first_conn_id)
        self.slots = access.ConnectionSlots(settings.max_connections)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.commands, self.outbox, trio.open_nursery() as nursery:
            # Listeners whose streams the broadcaster can write to without awaiting
            # (actors/subscriber_stream.py); intake holds each one from accept to close.
            sockets = await trio.open_tcp_listeners(self.settings.port, host=self.settings.host)
            listeners = [SubscriberListener(listener) for listener in sockets]
            await nursery.start(trio.serve_listeners, self._handle_stream, listeners)
            task_status.started(listeners[0].port)

    def stop_accepting(self) -> None:
        """The first step of the daemon's drain: from now on every handshake gets 503 and
        every command `not_initialized`; open connections keep receiving until the
        broadcaster closes them."""
        self.accepting = False

    async def _handle_stream(self, stream: SubscriberStream) -> None:
        """One TCP connection: read its WebSocket handshake (within close_timeout), serve
        it, close it. What trio-websocket's `wrap_server_stream` does, with
        StrictConnection (whose class that function cannot be told), so it uses the same
        two private steps (`_reader_task`, `_get_request`).

        Error handling: a bug while serving one connection is logged and costs that
        connection only; no client can take the server down.
        """
        async with trio.open_nursery() as nursery:
            connection = StrictConnection(
                stream,
                wsproto.WSConnection(wsproto.ConnectionType.SERVER),
                max_message_size=self.settings.max_message_size,
            )
            nursery.start_soon(connection._reader_task)
            with trio.move_on_after(self.settings.close_timeout) as waiting:
                request = await connection._get_request()
            if waiting.cancelled_caught:
                nursery.cancel_scope.cancel()
                await stream.aclose()
                return
            try:
                await self._handle(request, stream)
            except Exception:
                log.exception("subscriber.crashed")
            finally:
                with trio.move_on_after(self.settings.close_timeout):
                    await connection.aclose()

    async def _handle(self, request: WebSocketRequest, stream: SubscriberStream) -> None:
        """Check the handshake (options, origin, token, connection limit), then serve it.

        Error handling: a refused handshake gets its HTTP status and a short reason
        (never the token); a client that vanishes during the handshake is forgotten.
        While the daemon shuts down every handshake gets 503.
        """
        if not self.accepting:
            await self._refuse(request, 503, "the daemon is shutting down; try again later")
            return
        try:
            options = parse_options(request.path)
            grant = access.admit(self.settings, options.token, request.headers)
        except HandshakeError as e:
            await self._refuse(request, e.status, e.message)
            return
        if not self.slots.take():
            await self._refuse(request, 503, f"the daemon serves {self.slots.limit} connections already; try again later")
            return
        try:
            await self._serve(request, stream, options, grant)
        finally:
            self.slots.give_back()

    async def _refuse(self, request: WebSocketRequest, status: int, reason: str) -> None:
        log.info("subscriber.refused", status=status, reason=reason)
        try:
            await request.reject(status, body=reason.encode())
        except ConnectionClosed:
            pass  # the client is gone already

    async def _serve(
        self, request: WebSocketRequest, stream: SubscriberStream, options: SubscriberOptions, grant: Grant
    ) -> None:
        """Accept; announce the connection to the broadcaster; read its messages while a
        keep-alive task watches it; tell the broadcaster when and why it ended."""
        try:
            connection = await request.accept()
        except ConnectionClosed:
            return
        peer = Peer(next(self._ids), grant, TokenBucket(self.settings.rate_limit, self.settings.rate_burst))
        await self.outbox.send(Join(peer.conn_id, connection, options, stream))
        reason = "closed by client"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch, connection, peer)
                reason = await self._read(connection, peer)
                nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(1) as cleanup, contextlib.suppress(trio.BrokenResourceError):
                # (Broken: the daemon is stopping; nobody to tell.)
                cleanup.shield = True
                await self.outbox.send(Leave(peer.conn_id, reason))
                if peer.commanded:  # the streams it opened end by themselves
                    await self.commands.send(Envelope(peer.conn_id, Disconnected(), trio.current_time()))

    async def _read(self, connection: WebSocketConnection, peer: Peer) -> str:
        """Handle the connection's messages until it closes; return the disconnect reason."""
        try:
            while True:
                message = await connection.get_message()
                await self._on_message(peer, message)
        except ConnectionClosed as e:
            if peer.ended_because is not None:
                return peer.ended_because
            violation = connection.violation if isinstance(connection, StrictConnection) else None
            if violation is not None:
                return f"protocol violation: closed with {violation.code} ({violation.reason or violation.name})"
            if e.reason is not None and e.reason.code not in (1000, 1001, 1005):
                return f"closed with {e.reason.code} {e.reason.reason or ''}".strip()
            return "closed by client"

    async def _watch(self, connection: WebSocketConnection, peer: Peer) -> None:
        """Close a peer that stops answering pings: a dead network path never says so."""
        reason = await keep_alive(connection, interval=self.settings.ping_interval, timeout=self.settings.ping_timeout)
        if reason is None:
            return
        peer.ended_because = reason
        # A dead peer will not answer the close either: the stream is closed after the wait.
        with trio.move_on_after(self.settings.close_timeout):
            await connection.aclose(CLOSE_NO_PONG, "keepalive ping timeout")

    async def _on_message(self, peer: Peer, message: str | bytes) -> None:
        """Rate limit, validate and authorize one message, then pass its command on.

        Error handling: each failure is one `error` to this connection only (rate_limited,
        unauthorized, binary_not_accepted, a validation code, not_initialized once the daemon
        is shutting down); the connection stays open. A connection that may not command
        gets `unauthorized` for every message before it is parsed: nothing it sends
        reaches the parser (docs/access.md).
        """
        received_at = trio.current_time()
        # Every message pays APPEND_COST first; all but a stream's text_append pay the rest
        # once parsed: an assistant may append ten times as often as it may command.
        if not peer.bucket.take(APPEND_COST):
            await self._refuse_rate(peer)
            return
        peer.limited = False
        if not peer.grant.control:
            await self._reply_error(
                peer.conn_id, ErrorCode.UNAUTHORIZED, "this connection may listen but not command; connect with the control token"
            )
            return
        if isinstance(message, bytes):
            await self._reply_error(peer.conn_id, ErrorCode.BINARY_NOT_ACCEPTED, "binary frames are not accepted; send JSON text")
            return
        try:
            command = client_input.parse_client_message(message)
        except SpeechError as e:
            await self._reply_error(peer.conn_id, e.code, e.message)
            return
        if not isinstance(command, TextAppend) and not peer.bucket.take(1.0 - APPEND_COST):
            await self._refuse_rate(peer)
            return
        if not self.accepting:
            await self._reply_error(peer.conn_id, ErrorCode.NOT_INITIALIZED, "the daemon is shutting down; no new commands")
            return
        peer.commanded = True
        await self.commands.send(Envelope(peer.conn_id, command, received_at))

    async def _refuse_rate(self, peer: Peer) -> None:
        # Logged once per run of refusals: a flooding client must not flood the log.
        if not peer.limited:
            peer.limited = True
            log.info("command.rejected", code="rate_limited", conn=peer.conn_id)
        error = access.rate_limited_error(self.settings, peer.bucket.wait_seconds())
        await self.outbox.send(Reply(peer.conn_id, error))

    async def _reply_error(self, conn_id: int, code: ErrorCode, message: str) -> None:
        log.info("command.rejected", code=code, conn=conn_id)
        await self.outbox.send(Reply(conn_id, ErrorEvent(code, message)))
