"""One subscriber as the broadcaster sees it: its options, its outgoing queue bounded in
bytes, and the fast path that writes a frame straight to its socket when nothing is queued.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from pipeline.flow import FastPath, Outlet, SubscriberOptions


@dataclass(frozen=True)
class Pending:
    """Queued when the socket took only part of a frame: the sender flushes the rest."""

    size: int


@dataclass
class Subscriber:
    """One connection: its options, its outgoing queue (bounded in bytes) and sender."""

    conn_id: int
    connection: Outlet
    options: SubscriberOptions
    limit: int
    queue_send: trio.MemorySendChannel[str | bytes | Pending]
    queue_recv: trio.MemoryReceiveChannel[str | bytes | Pending]
    queued_bytes: int = 0
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    dropped: bool = False
    going_away: bool = False  # the daemon stops: send what is queued, then close with 1001
    stream: FastPath | None = None  # a WebSocket's socket: the fast path for frames

    def write_through(self, wire: bytes) -> bool:
        """Hand a whole frame's wire bytes to the socket now, when nothing is queued or
        being written for this subscriber; False when `wire` must be queued instead."""
        if self.stream is None or self.queued_bytes or self.dropped or self.going_away:
            return False
        if self.connection.closed is not None:
            return False
        left = self.stream.write_nowait(wire)
        if left is None:
            return False
        if left:
            # The rest goes out before anything else; the sender task writes it.
            self.queued_bytes += left
            self.queue_send.send_nowait(Pending(left))
        return True

    def push(self, data: str | bytes) -> bool:
        """Queue `data`; False when that would exceed the subscriber's byte limit."""
        if self.dropped or self.going_away:
            return True
        size = len(data)
        if self.queued_bytes + size > self.limit:
            return False
        self.queued_bytes += size
        self.queue_send.send_nowait(data)
        return True
