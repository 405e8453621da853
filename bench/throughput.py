"""Throughput of the daemon on the embedded voice: utterances per minute with one and with
two Piper worker processes.

Starts `speechcast serve --piper-workers N` as its own process for each N, sends UTTERANCES
five-sentence texts back to back from one WebSocket client (all queued at once), and
times from the first send to the last `utterance_finished`. With two workers the lookahead
piece is synthesized on the second core while the current one is, so the figure shows
what the second worker buys on this machine.
"""

from __future__ import annotations

import json
import subprocess
import time

import trio
from trio_websocket import open_websocket_url

from bench.machine import describe
from bench.ttfa import FIVE, SPEECHCAST, _drain, _started_port

UTTERANCES = 8
WORKERS = (1, 2)


async def utterances_per_minute(workers: int) -> tuple[float, float]:
    """(utterances per minute, seconds of audio per second of wall time)."""
    process = await trio.lowlevel.open_process(
        [SPEECHCAST, "serve", "--port", "0", "--http-port", "0", "--piper-workers", str(workers)],
        stdout=subprocess.PIPE,
    )
    try:
        port = await _started_port(process.stdout)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, process.stdout)
            async with open_websocket_url(f"ws://127.0.0.1:{port}/?subscribe=0") as ws:
                await ws.get_message()  # hello
                await _speak_all(ws, ["Warming up the voice."])
                start = time.perf_counter()
                audio_ms = await _speak_all(ws, [FIVE] * UTTERANCES)
                elapsed = time.perf_counter() - start
            nursery.cancel_scope.cancel()
        return UTTERANCES / elapsed * 60, audio_ms / 1000 / elapsed
    finally:
        process.terminate()
        await process.wait()


async def _speak_all(ws, texts: list[str]) -> float:
    """Queue every text, wait until each has finished ok; the total audio in ms."""
    for text in texts:
        await ws.send_message(json.dumps({"type": "send_message", "text": text}))
    pending, audio_ms = len(texts), 0.0
    while pending:
        message = await ws.get_message()
        if isinstance(message, str):
            event = json.loads(message)
            if event["type"] == "utterance_finished":
                assert event["status"] == "ok", event
                pending -= 1
                audio_ms += event["audio_ms"]
    return audio_ms


def main() -> None:
    print(f"Throughput, {UTTERANCES} five-sentence utterances back to back — {describe()}\n")
    print(f"| {'Piper workers':<14} | {'utterances/min':>14} | {'audio s per s':>13} |")
    print(f"|{'-' * 16}|{'-' * 16}|{'-' * 15}|")
    for workers in WORKERS:
        per_minute, speed = trio.run(utterances_per_minute, workers)
        print(f"| {workers:<14} | {per_minute:14.1f} | {speed:13.1f} |", flush=True)


if __name__ == "__main__":
    main()
