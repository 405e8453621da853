"""Subscriber formats: WAV chunks, raw PCM, zlib-compressed frames — all the same audio,
each variant encoded once per chunk whatever the number of subscribers."""

from __future__ import annotations

import json

import trio
from trio_websocket import open_websocket_url

from actors.broadcaster import Broadcaster
from pipeline import protocol
from pipeline.audio import read_wav
from pipeline.config import Settings
from pipeline.daemon import running_daemon
from pipeline.flow import Frame, Join, SubscriberOptions
from tests.support import ScriptedProvider, provider_set, send, tone

SETTINGS = Settings(port=0, http_port=0)
QUERIES = ["", "?format=pcm", "?compress=1", "?format=pcm&compress=1"]


async def collect(ws) -> tuple[list[bytes], dict]:
    raw_frames, started = [], {}
    while True:
        message = await ws.get_message()
        if isinstance(message, bytes):
            raw_frames.append(message)
            continue
        event = json.loads(message)
        if event["type"] == "utterance_started":
            started = event
        if event["type"] == "utterance_finished":
            return raw_frames, started


async def test_every_format_and_compression_carries_the_same_pcm():
    # A quiet ramp compresses well, so compressed frames really are compressed.
    provider = ScriptedProvider(script=lambda text: [tone(12000, value=0)])
    with trio.fail_after(30):
        async with running_daemon(SETTINGS, provider_set(SETTINGS, provider)) as daemon:
            async with trio.open_nursery() as nursery:
                results: dict[str, tuple] = {}
                ready = trio.Semaphore(0)

                async def subscriber(query: str) -> None:
                    async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/{query}") as ws:
                        await ws.get_message()  # hello
                        ready.release()
                        results[query] = await collect(ws)

                for query in QUERIES:
                    nursery.start_soon(subscriber, query)
                for _ in QUERIES:
                    await ready.acquire()
                async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/?subscribe=0") as control:
                    await send(control, type="send_message", text="Same audio for everyone.")
    pcm_by_query = {}
    for query, (frames, started) in results.items():
        assert started["format"] == ("pcm" if "pcm" in query else "wav")
        compressed = [protocol.is_compressed(f) for f in frames]
        assert any(compressed) == ("compress=1" in query)
        assert all(f[0] == 0x02 for f, c in zip(frames, compressed) if not c)
        decoded = [protocol.decode_voice_frame(f) for f in frames]
        if "pcm" in query:
            pcm_by_query[query] = b"".join(f.audio for f in decoded)
        else:
            assert all(read_wav(f.audio)[0] == started["sample_rate"] for f in decoded)
            pcm_by_query[query] = b"".join(read_wav(f.audio)[1] for f in decoded)
    assert set(pcm_by_query.values()) == {bytes(provider.produced)}


class RecordingConnection:
    """Stands in for a WebSocket connection; remembers the objects it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[str | bytes] = []
        self.got_frame = trio.Event()

    async def send_message(self, data: str | bytes) -> None:
        self.sent.append(data)
        if isinstance(data, bytes):
            self.got_frame.set()

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        pass


async def test_each_variant_is_encoded_once_and_shared_by_all_its_subscribers():
    inbox_send, inbox_recv = trio.open_memory_channel(100)
    connections = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(Broadcaster(SETTINGS, inbox_recv).run)
        for conn_id, (fmt, compress) in enumerate([("wav", False)] * 3 + [("pcm", True)] * 2):
            connections[conn_id] = RecordingConnection()
            await inbox_send.send(Join(conn_id, connections[conn_id], SubscriberOptions(format=fmt, compress=compress)))
        frame = Frame("u1", 0, True, tone(4800, value=0))
        await inbox_send.send(frame)
        with trio.fail_after(10):
            for connection in connections.values():
                await connection.got_frame.wait()
        nursery.cancel_scope.cancel()
    frames = [[d for d in c.sent if isinstance(d, bytes)][0] for c in connections.values()]
    assert frames[0] is frames[1] is frames[2] and frames[3] is frames[4]
    assert frames[0] is not frames[3]
