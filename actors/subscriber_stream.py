"""The socket under each WebSocket subscriber, with a write path that does not await:
the fan-out's hot path.

A server's WebSocket frames are not masked, so one audio chunk has the same wire bytes
for every subscriber: the broadcaster frames it once (`message_frame`) and hands those
bytes to each subscriber's `SubscriberStream.write_nowait`, which gives them straight to
the kernel when nothing else is being written on that connection. That skips, per
subscriber and chunk, a task switch, a channel hop, trio-websocket's lock and wsproto's
framing (and its copy of the chunk). Whatever the kernel does not take at once is kept
and written before anything else (`flush`, or the next `send_all`), so bytes on the wire
never interleave. trio-websocket writes only through `send_all` (pings, pongs, text
events, the close handshake), which is serialized with `write_nowait` by one lock.

Intake serves WebSockets on `SubscriberListener`s and hands each connection's stream to
the broadcaster with its Join.
"""

from __future__ import annotations

import os

import trio
from wsproto.frame_protocol import FrameProtocol


def message_frame(message: str | bytes) -> bytes:
    """The wire bytes of one complete, unmasked (server to client) message: a text frame
    for str, a binary frame for bytes (wsproto's own encoder, as trio-websocket uses)."""
    return bytes(FrameProtocol(client=False, extensions=[]).send_data(message, fin=True))


class SubscriberStream(trio.abc.HalfCloseableStream):
    """A SocketStream (wrapped: trio's cannot be subclassed) that can also take whole
    frames without awaiting.

    Error handling: `write_nowait` never raises; a socket error leaves the bytes pending,
    so that the next `flush` or `send_all` raises it where trio-websocket expects it.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._write_lock = trio.Lock()
        self._pending: memoryview | None = None

    @property
    def pending_bytes(self) -> int:
        return 0 if self._pending is None else len(self._pending)

    def write_nowait(self, data: bytes) -> int | None:
        """Write `data` now; return how many bytes are left pending (0: all written), or
        None, writing nothing, while another write is in progress or pending (then the
        caller queues `data` behind it)."""
        if self._pending is not None or self._write_lock.locked():
            return None
        # Asked each time: once the socket is closed its number may belong to another file.
        fd = self.stream.socket.fileno()
        try:
            written = os.write(fd, data) if fd >= 0 else 0
        except OSError:
            written = 0  # kept pending: flush() meets the same error (or EAGAIN) and reports it
        if written < len(data):
            self._pending = memoryview(data)[written:]
        return len(data) - written

    async def flush(self) -> None:
        """Write what `write_nowait` left pending (nothing to do when nothing is)."""
        async with self._write_lock:
            await self._flush_pending()

    async def _flush_pending(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await self.stream.send_all(pending)

    # ---- trio.abc.HalfCloseableStream, by delegation; every write goes after what is pending

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._write_lock:
            await self._flush_pending()
            await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        async with self._write_lock:
            await self._flush_pending()
            await self.stream.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


class SubscriberListener(trio.abc.Listener[SubscriberStream]):
    """A SocketListener (wrapped, like the stream) whose connections are SubscriberStreams."""

    def __init__(self, listener: trio.SocketListener) -> None:
        self.listener = listener

    @property
    def port(self) -> int:
        return int(self.listener.socket.getsockname()[1])

    async def accept(self) -> SubscriberStream:
        return SubscriberStream(await self.listener.accept())

    async def aclose(self) -> None:
        await self.listener.aclose()
