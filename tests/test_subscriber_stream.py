"""The fan-out's fast path (actors/subscriber_stream.py): whole frames written without
awaiting never interleave with anything else written on the connection, and intake
really hands the broadcaster each WebSocket's stream.

A socket pair stands in for a connection; `trio.fail_after` around all I/O.
"""

from __future__ import annotations

import pytest
import trio
from trio_websocket import open_websocket_url
from wsproto.frame_protocol import FrameProtocol, Opcode

from actors.intake import Intake
from actors.subscriber_stream import SubscriberStream, message_frame
from pipeline.config import Settings
from pipeline.flow import Join


def stream_pair() -> tuple[SubscriberStream, trio.SocketStream]:
    ours, theirs = trio.socket.socketpair()
    return SubscriberStream(trio.SocketStream(ours)), trio.SocketStream(theirs)


async def read_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        data += await stream.receive_some(size - len(data))
    return bytes(data)


async def test_what_the_socket_does_not_take_goes_out_before_anything_else():
    sender, receiver = stream_pair()
    big = message_frame(bytes(range(256)) * 4096)  # 1 MiB: more than the socket buffers hold
    with trio.fail_after(10):
        left = sender.write_nowait(big)
        assert left and left < len(big) and sender.pending_bytes == left
        assert sender.write_nowait(b"later") is None  # refused while something is pending
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.send_all, b"PING")  # e.g. trio-websocket's own ping
            received = await read_exactly(receiver, len(big) + 4)
    assert received == big + b"PING"
    assert sender.pending_bytes == 0
    assert sender.write_nowait(b"now") == 0
    with trio.fail_after(10):
        assert await read_exactly(receiver, 3) == b"now"


async def test_flush_writes_the_rest_and_nothing_when_nothing_is_pending():
    sender, receiver = stream_pair()
    big = message_frame(b"\x01" * (1 << 20))
    with trio.fail_after(10):
        await sender.flush()  # nothing pending: returns at once
        sender.write_nowait(big)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.flush)
            assert await read_exactly(receiver, len(big)) == big


def test_message_frames_are_what_a_client_decodes():
    client = FrameProtocol(client=True, extensions=[])
    client.receive_bytes(message_frame(b"\x02audio") + message_frame('{"type":"hello"}'))
    frames = list(client.received_frames())
    assert [(f.opcode, f.payload) for f in frames] == [(Opcode.BINARY, b"\x02audio"), (Opcode.TEXT, '{"type":"hello"}')]


async def test_intake_hands_the_broadcaster_each_websockets_stream():
    commands_send, _commands_recv = trio.open_memory_channel(10)
    outbox_send, outbox_recv = trio.open_memory_channel(10)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(Intake(Settings(port=0), commands_send, outbox_send).run)
            async with open_websocket_url(f"ws://127.0.0.1:{port}/"):
                join = await outbox_recv.receive()
            nursery.cancel_scope.cancel()
    assert isinstance(join, Join)
    assert isinstance(join.stream, SubscriberStream)


async def test_a_closed_stream_writes_nothing_and_the_flush_reports_it():
    sender, receiver = stream_pair()
    await sender.aclose()
    # Its descriptor number may already belong to another file: nothing may be written.
    assert sender.write_nowait(b"late") == 4
    with trio.fail_after(10):
        with pytest.raises(trio.ClosedResourceError):
            await sender.flush()
    await receiver.aclose()
