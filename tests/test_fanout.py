"""Fan-out while listeners come and go (DESIGN.md section 4): a subscriber that joins
mid-utterance starts cleanly at the next chunk, and connections arriving and leaving
during an utterance change nothing for everyone else.

The provider here yields audio only when the test says so, so "during an utterance" is
a fact of the test, not a race. Loopback, port 0, `trio.fail_after` around all I/O.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import trio
from trio_websocket import open_websocket_url

from pipeline import protocol
from pipeline.audio import ms_to_bytes
from pipeline.config import Settings
from pipeline.daemon import running_daemon
from tests.support import (
    Heard,
    ScriptedProvider,
    finished,
    of_type,
    provider_set,
    receive_until,
    send,
    tone,
    ws_url,
)
from tests.test_slow_subscribers import never_reading_client

# Plain 200 ms chunks from the start, so chunk counts follow from the audio given.
SETTINGS = dataclasses.replace(Settings(port=0, http_port=0), first_chunks_ms=(), chunk_ms=200)
CHUNK_SAMPLES = ms_to_bytes(200, SETTINGS.sample_rate) // 2


class SteppedProvider(ScriptedProvider):
    """Yields each PCM piece the test puts into `pieces`; the utterance's audio ends
    when the test closes that channel."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces_send, self.pieces = trio.open_memory_channel[bytes](0)

    async def synthesize(self, text: str, voice: str | None, speed: float | None) -> AsyncIterator[bytes]:
        self.texts.append(text)
        async for pcm in self.pieces:
            self.produced += pcm
            yield pcm


async def read_one(ws, heard: Heard) -> None:
    """Read exactly one message (event or chunk) into `heard`."""
    message = await ws.get_message()
    if isinstance(message, bytes):
        heard.frames.append(protocol.decode_voice_frame(message))
        heard.order.append("chunk")
    else:
        event = json.loads(message)
        heard.events.append(event)
        heard.order.append(event["type"])


async def receive_chunks(ws, heard: Heard, count: int) -> None:
    target = len(heard.frames) + count
    while len(heard.frames) < target:
        await read_one(ws, heard)


async def test_a_listener_joining_mid_utterance_gets_utterance_started_then_the_next_chunk():
    provider = SteppedProvider()
    with trio.fail_after(30):
        async with running_daemon(SETTINGS, provider_set(SETTINGS, provider)) as daemon:
            async with open_websocket_url(ws_url(daemon.port)) as early:
                heard_early = Heard()
                await receive_until(early, heard_early, of_type("hello"))
                await send(early, type="send_message", text="A long story.")
                # Three and a half chunks: three go out, half a chunk is held back.
                await provider.pieces_send.send(tone(CHUNK_SAMPLES * 7 // 2))
                await receive_chunks(early, heard_early, 3)
                async with open_websocket_url(ws_url(daemon.port)) as late:
                    heard_late = Heard()
                    await receive_until(late, heard_late, of_type("utterance_started"))
                    await provider.pieces_send.send(tone(CHUNK_SAMPLES * 3, value=5000))
                    await provider.pieces_send.aclose()
                    await receive_until(early, heard_early, finished())
                    await receive_until(late, heard_late, finished())
    started = heard_early.of_type("utterance_started")[0]
    assert heard_late.order[:3] == ["hello", "utterance_started", "chunk"]
    assert heard_late.of_type("utterance_started")[0] == started
    assert [f.chunk_id for f in heard_late.frames] == [started["first_chunk_id"] + i for i in range(3, 7)]
    assert heard_late.frames == heard_early.frames[3:]  # the very same chunks
    assert heard_late.order[-1] == "utterance_finished" and heard_late.frames[-1].is_final


async def test_listeners_coming_and_going_mid_utterance_change_nothing_for_the_rest():
    provider = SteppedProvider()
    with trio.fail_after(60):
        async with running_daemon(SETTINGS, provider_set(SETTINGS, provider)) as daemon:
            async with AsyncExitStack() as stack:
                stable = [await stack.enter_async_context(open_websocket_url(ws_url(daemon.port))) for _ in range(10)]
                heard = [Heard() for _ in stable]
                for ws, h in zip(stable, heard, strict=True):
                    await receive_until(ws, h, of_type("hello"))
                await send(stable[0], type="send_message", text="An announcement for the regulars.")
                for k in range(6):
                    await provider.pieces_send.send(tone(CHUNK_SAMPLES * 2, value=1000 * k))
                    # Between pieces: a visitor hears the start of a chunk stream and leaves;
                    # one sends a bad command and leaves before its answer; one drops its
                    # TCP connection without a close handshake.
                    async with open_websocket_url(ws_url(daemon.port)) as visitor:
                        await receive_until(visitor, Heard(), of_type("utterance_started"))
                    async with open_websocket_url(ws_url(daemon.port)) as rude:
                        await rude.send_message('{"type": "dance"}')
                    abrupt = await never_reading_client(daemon.port)
                    await abrupt.aclose()
                await provider.pieces_send.aclose()
                async with trio.open_nursery() as nursery:
                    for ws, h in zip(stable, heard, strict=True):
                        nursery.start_soon(receive_until, ws, h, finished())
    for h in heard:
        started, done = h.of_type("utterance_started")[0], h.of_type("utterance_finished")[0]
        assert [t for t in h.order if t not in ("chunk", "accepted")] == ["hello", "utterance_started", "utterance_finished"]
        assert [f.chunk_id for f in h.frames] == [started["first_chunk_id"] + i for i in range(done["chunks"])]
        assert h.pcm() == bytes(provider.produced)
        assert done["status"] == "ok"
