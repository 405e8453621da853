"""The WebSocket connection details intake relies on: the strict close on a protocol
violation, and the keep-alive that finds peers who vanished without a word."""

from __future__ import annotations

import contextlib

import trio
import wsproto
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState


async def keep_alive(connection: WebSocketConnection, *, interval: float, timeout: float) -> str | None:
    """Ping every `interval` seconds; return a disconnect reason once a pong has not
    arrived within `timeout`. Runs until then: cancel it to stop it.

    Error handling: a connection that closes meanwhile returns None (nothing for the
    caller to do: its reader sees the close).
    """
    while True:
        await trio.sleep(interval)
        with trio.move_on_after(timeout):
            try:
                await connection.ping()
            except ConnectionClosed:
                return None
            continue
        return f"no pong within {timeout:g} s"


class StrictConnection(WebSocketConnection):
    """trio-websocket's connection, failing a protocol violation the way RFC 6455 7.1.7
    asks: with a close frame carrying the code (1002 protocol error, 1007 invalid UTF-8
    in a text frame) before the TCP close, not a silent drop.

    wsproto reports a frame it cannot parse as a close event while the connection is
    still open; trio-websocket 0.12 then records the code and closes the socket without
    sending it. Here that one case sends the close first and keeps the reason in
    `violation` for the log. It relies on two private methods of trio-websocket 0.12
    (this override and `_send`); tests/test_edge_input.py reads the close frame off the
    wire, so an upgrade that changes them fails a test instead of passing silently.
    """

    violation: CloseReason | None = None

    async def _handle_close_connection_event(self, event: wsproto.events.CloseConnection) -> None:
        if self._wsproto.state is ConnectionState.OPEN:
            # Not a close the peer sent (that moves wsproto to REMOTE_CLOSING first).
            self.violation = CloseReason(event.code, event.reason or None)
            with contextlib.suppress(ConnectionClosed):
                await self._send(event)
        await super()._handle_close_connection_event(event)
