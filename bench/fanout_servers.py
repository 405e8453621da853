"""The two servers that bench/fanout.py measures, each run in its own process:

- the speechcast daemon (intake, router, chunker, broadcaster, unchanged), speaking one
  long utterance from a paced provider whose PCM carries timestamps;
- a reference broadcaster written with the `websockets` library's own `broadcast()`,
  sending frames of the same bytes and sizes at the same rate.

Both put, in the first 8 bytes of each chunk's PCM, the CLOCK_MONOTONIC time (ns, the
same clock in every process of the machine) at which that chunk is due to be
broadcast; a client's lag is its receipt time minus that stamp. A server that wakes up
late pays for it in lag: stamps are the schedule, not the moment it got round to it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection

import numpy as np

from pipeline import protocol
from pipeline.audio import ms_to_bytes, wav_bytes
from pipeline.commands import TTSProvider

SAMPLE_RATE = 24000
CHUNK_MS = 200
CHUNK_BYTES = ms_to_bytes(CHUNK_MS, SAMPLE_RATE)
# The first chunk is due this long after the stream is asked for (connection set-up done).
LEAD_NS = 100_000_000
# The reference's stand-in for `utterance_finished`: clients stop reading at it.
DONE_EVENT = json.dumps({"type": "utterance_finished", "status": "ok"})


def _speech_like(n_bytes: int) -> bytes:
    """A voiced-sounding signal (a 150 Hz buzz with noise, its loudness swinging at a
    syllable rate), so that format=opus encodes as much as it would for speech: an
    encoder given silence does almost nothing and sends almost nothing."""
    n = n_bytes // 2
    t = np.arange(n) / SAMPLE_RATE
    rng = np.random.default_rng(7)
    signal = (np.sin(2 * np.pi * 150 * t) * 5000 + rng.normal(0, 1200, n)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    return signal.astype("<i2").tobytes()


_BODY = _speech_like(CHUNK_BYTES - 8)


def stamped_pcm(due_ns: int) -> bytes:
    """One chunk of speech-like sound whose first 8 bytes are the time it is due (little-endian)."""
    return due_ns.to_bytes(8, "little") + _BODY


async def _sleep_until_ns(due_ns: int, sleep) -> None:
    delay = (due_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        await sleep(delay)


# ---------------------------------------------------------------- the daemon


def run_daemon(pipe: Connection, frames: int, rate: float, broker: str | None = None) -> None:
    """Process entry: serve the daemon on a free loopback port, send the port on `pipe`,
    run until terminated. Logs below ERROR are silenced (2000 `subscriber.connected`
    lines would measure the terminal); clients count too-slow closes (code 1013).
    `broker`: one of several daemons sharing that Redis (bench/scaleout.py)."""
    import trio

    from pipeline.config import Settings
    from pipeline.daemon import serve
    from pipeline.logs import configure_logging
    from pipeline.providers.base import Provider
    from pipeline.providers.registry import ProviderSet

    class PacedProvider(Provider):
        """Yields `frames` chunk-sized pieces, one every 1/`rate` s. The chunker holds
        the newest chunk until the next audio arrives, so piece k is broadcast when
        piece k+1 is yielded: piece k carries the due time of piece k+1."""

        name = TTSProvider.PIPER
        sample_rate = SAMPLE_RATE
        default_voice = "paced"

        async def synthesize(self, text: str, voice: str | None, speed: float | None) -> AsyncIterator[bytes]:
            period_ns = int(1e9 / rate)
            start = time.monotonic_ns() + LEAD_NS
            for k in range(frames):
                await _sleep_until_ns(start + k * period_ns, trio.sleep)
                yield stamped_pcm(start + (k + 1) * period_ns)
            # The last chunk goes out when the utterance ends: at its due time.
            await _sleep_until_ns(start + frames * period_ns, trio.sleep)

    configure_logging("json", level=logging.ERROR)
    settings = Settings(
        host="127.0.0.1",
        port=0,
        http_port=0,
        sample_rate=SAMPLE_RATE,
        chunk_ms=CHUNK_MS,
        first_chunks_ms=(),
        fallback=(),
        max_connections=100_000,
        broker=broker,
    )
    provider = PacedProvider()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            daemon = await nursery.start(serve, settings, ProviderSet({provider.name: provider}, settings))
            pipe.send(daemon.port)

    trio.run(main)


# ---------------------------------------------------------------- the reference


def run_reference(pipe: Connection, frames: int, rate: float) -> None:
    """Process entry: a minimal `websockets` broadcaster. Subscribers connect to `/`;
    a text message on a connection to `/control` starts one stream of `frames` frames
    at `rate` per second, ended by DONE_EVENT."""
    from websockets.asyncio.server import broadcast, serve

    subscribers: set = set()

    async def stream() -> None:
        period_ns = int(1e9 / rate)
        start = time.monotonic_ns() + LEAD_NS
        for k in range(frames):
            due = start + k * period_ns
            await _sleep_until_ns(due, asyncio.sleep)
            audio = wav_bytes(stamped_pcm(due), SAMPLE_RATE)
            broadcast(subscribers, protocol.encode_voice_frame(k, k == frames - 1, audio))
        broadcast(subscribers, DONE_EVENT)

    async def handler(ws) -> None:
        if ws.request.path.startswith("/control"):
            async for _ in ws:
                await stream()
            return
        subscribers.add(ws)
        try:
            await ws.send(json.dumps({"type": "hello"}))
            await ws.wait_closed()
        finally:
            subscribers.discard(ws)

    async def main() -> None:
        # No permessage-deflate: the daemon does not compress by default either.
        async with serve(handler, "127.0.0.1", 0, compression=None, max_queue=None) as server:
            pipe.send(server.sockets[0].getsockname()[1])
            await asyncio.get_running_loop().create_future()

    logging.getLogger("websockets").setLevel(logging.ERROR)
    asyncio.run(main())
