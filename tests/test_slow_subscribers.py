"""One slow or dead client never hurts the others (DESIGN.md section 4, issue 2 and 5)."""

from __future__ import annotations

import dataclasses
import socket

import trio
from structlog.testing import capture_logs
from trio_websocket import open_websocket_url

from pipeline.config import Settings
from pipeline.daemon import running_daemon
from tests.support import Heard, ScriptedProvider, finished, of_type, provider_set, receive_until, send, tone

SECOND = 24000  # samples
PIECES = 80


async def never_reading_client(port: int) -> trio.SocketStream:
    """A WebSocket client that completes the handshake and then never reads a byte."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A tiny receive window so the daemon's writes to it block soon.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    return stream


async def test_a_subscriber_that_never_reads_is_dropped_while_fifty_others_hear_everything():
    # Forty seconds of audio, produced at about 16x real time like the embedded voice:
    # far more than the slow client's queue and socket buffers hold (and more than 20
    # characters can hold: the audio cap is raised for this test).
    settings = dataclasses.replace(Settings(port=0, http_port=0), subscriber_queue_bytes=256 * 1024, close_timeout=1.0,
                                   max_audio_per_char=5.0)
    provider = ScriptedProvider(script=lambda text: [tone(SECOND // 2)] * PIECES, seconds=0.03)
    with trio.fail_after(60), capture_logs() as logs:
        async with running_daemon(settings, provider_set(settings, provider)) as daemon:
            slow = await never_reading_client(daemon.port)
            heard = [Heard() for _ in range(50)]
            async with trio.open_nursery() as nursery:

                async def listen(i: int, ready: trio.MemorySendChannel) -> None:
                    async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/") as ws:
                        await receive_until(ws, heard[i], of_type("hello"))
                        await ready.send(ws)
                        await receive_until(ws, heard[i], finished())

                ready_send, ready_recv = trio.open_memory_channel(50)
                for i in range(50):
                    nursery.start_soon(listen, i, ready_send)
                sockets = [await ready_recv.receive() for _ in range(50)]
                await send(sockets[0], type="send_message", text="A long announcement.")
            await slow.aclose()
    done = heard[0].of_type("utterance_finished")[0]
    assert done["status"] == "ok"
    for h in heard:
        assert [f.chunk_id for f in h.frames] == list(range(done["last_chunk_id"] - done["chunks"] + 1, done["last_chunk_id"] + 1))
        assert len(h.pcm()) == PIECES * SECOND
    [dropped] = [e for e in logs if e["event"] == "subscriber.too_slow"]
    gone = [e for e in logs if e["event"] == "subscriber.disconnected" and e["conn"] == dropped["conn"]]
    assert [e["reason"] for e in gone] == ["too slow"]
