"""Streamed text: first audio and stalls while a simulated language model writes its reply.

Starts `speechcast serve` as its own process (as bench/ttfa.py does) and, from this process,
plays a language model: one WebSocket connection sends `text_start`, then a fixed 120-word
reply as word-sized tokens (each word with its following space is one `text_append`) at a
steady rate (15, 40, 100 tokens/s), then `text_end`. The same connection is a real
subscriber: it receives the VOICE_DATA frames and decodes their WAV payloads. Per run:

(a) first audio after sending `text_start`;
(b) first audio after sending the token that completed the first piece (the first append
    for which `StreamSegmenter`, fed the same tokens, releases a piece), beside Piper alone
    synthesizing that same first piece in the same run, through `PiperProvider`'s worker
    pool (loaded as the daemon loads it, in this process, while the daemon is idle);
(c) the longest stall on the playback timeline: a listener starts playing at the first
    chunk and plays the chunks back to back; a chunk that arrives after the previous one has
    finished playing starts late by that much. The voice's own pauses are inside the chunks,
    so they never count as stalls.

Prints one table with p50/p95 over the runs for each rate, and the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from dataclasses import dataclass

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from bench.machine import describe
from bench.ttfa import SPEECHCAST, _drain, _started_port, percentile
from pipeline.audio import pcm_ms, read_wav
from pipeline.protocol import decode_voice_frame
from pipeline.stream_text import StreamSegmenter
from pipeline.text import split_pieces

RUNS = 20
RATES = (15, 40, 100)  # tokens per second
REPLY = (
    "Sure, here is what I found about the old lighthouse on the northern cape. "
    "It was built in 1871, when ships still carried coal and timber along that rocky coast, "
    "and for almost a century a keeper lived there with his family. "
    "The tower is twenty meters tall, painted white, with a red band near the top. "
    "In 1962 the light was automated, so the last keeper moved to the village, where he "
    "opened a small museum. "
    "Today you can climb the stairs on weekends, but the lamp room stays closed. "
    "If you visit in the spring, bring a warm coat, because the wind is strong, and check "
    "the ferry times before you leave, since the last boat goes early."
)
TOKENS = [word + " " for word in REPLY.split(" ")]
assert len(TOKENS) == 120, len(TOKENS)


def first_piece_token() -> tuple[int, str]:
    """Index of the token whose append releases the first piece, and that piece (stripped)."""
    segmenter = StreamSegmenter()  # the daemon's defaults: short first piece, 250 chars
    for index, token in enumerate(TOKENS):
        released = segmenter.append(token)
        if released:
            assert released[0] == split_pieces(REPLY)[0], released
            return index, released[0].strip()
    raise AssertionError("the reply never releases a piece before its end")


@dataclass
class Run:
    from_start: float  # (a) seconds
    from_token: float  # (b) seconds
    longest_stall: float  # (c) seconds
    ttfa_ms: float | None  # the daemon's own figure, for a cross-check


async def stream_once(port: int, rate: float, completing: int) -> Run:
    """One streamed reply at `rate` tokens/s, measured as a subscriber on the same connection."""
    async with open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
        started = time.perf_counter()
        await ws.send_message(json.dumps({"type": "text_start"}))
        utterance_id = await _accepted(ws)
        sent: dict[int, float] = {}
        arrivals: list[tuple[float, float]] = []  # (arrival, audio seconds) per chunk
        finished: dict[str, object] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_model, ws, utterance_id, rate, sent)
            while True:
                message = await ws.get_message()
                now = time.perf_counter()
                if isinstance(message, bytes):
                    sample_rate, pcm = read_wav(decode_voice_frame(message).audio)
                    arrivals.append((now, pcm_ms(len(pcm), sample_rate) / 1000))
                    continue
                event = json.loads(message)
                if event["type"] == "error":
                    raise RuntimeError(f"the daemon refused a command: {event}")
                if event["type"] == "utterance_finished" and event.get("utterance_id") == utterance_id:
                    finished = event
                    break
        if finished.get("status") != "ok" or not arrivals:
            raise RuntimeError(f"the streamed utterance did not finish ok: {finished}")
        first = arrivals[0][0]
        ttfa = finished.get("ttfa_ms")
        return Run(first - started, first - sent[completing], longest_stall(arrivals),
                   float(ttfa) if isinstance(ttfa, (int, float)) else None)


async def _accepted(ws: WebSocketConnection) -> str:
    while True:
        event = json.loads(await ws.get_message())  # hello comes first
        if event["type"] == "accepted":
            return str(event["utterance_id"])
        if event["type"] == "error":
            raise RuntimeError(f"text_start refused: {event}")


async def _model(ws: WebSocketConnection, utterance_id: str, rate: float, sent: dict[int, float]) -> None:
    """The simulated model: token i leaves at i / rate seconds (absolute times, so no drift)."""
    begin = trio.current_time()
    for index, token in enumerate(TOKENS):
        await trio.sleep_until(begin + index / rate)
        sent[index] = time.perf_counter()
        await ws.send_message(json.dumps({"type": "text_append", "utterance_id": utterance_id, "text": token}))
    await ws.send_message(json.dumps({"type": "text_end", "utterance_id": utterance_id}))


def longest_stall(arrivals: list[tuple[float, float]]) -> float:
    """Longest lateness of a chunk on the playback timeline (0 when audio always came in time)."""
    playing_until = arrivals[0][0]
    worst = 0.0
    for arrival, seconds in arrivals:
        worst = max(worst, arrival - playing_until)
        playing_until = max(playing_until, arrival) + seconds
    return worst


async def measure(runs: int) -> tuple[dict[int, list[Run]], list[float], str]:
    from pipeline.providers.piper import PiperProvider

    completing, piece = first_piece_token()
    process = await trio.lowlevel.open_process(
        [SPEECHCAST, "serve", "--port", "0", "--http-port", "0"], stdout=subprocess.PIPE
    )
    provider = PiperProvider()
    try:
        port = await _started_port(process.stdout)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, process.stdout)  # so the daemon's log pipe never fills
            await provider.open()  # starts and warms the workers, as the daemon does
            await stream_once(port, 100, completing)  # warm-up
            await _piper_alone(provider, "Warming up.")
            results: dict[int, list[Run]] = {rate: [] for rate in RATES}
            piper: list[float] = []
            for _ in range(runs):  # rates interleaved, so load on the machine hits each of them
                for rate in RATES:
                    results[rate].append(await stream_once(port, rate, completing))
                    piper.append(await _piper_alone(provider, piece))
            nursery.cancel_scope.cancel()
        return results, piper, piece
    finally:
        await provider.aclose()
        process.terminate()
        await process.wait()


async def _piper_alone(provider: object, text: str) -> float:
    start = time.perf_counter()
    async for _ in provider.synthesize(text, None, None):  # type: ignore[attr-defined]
        break
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS, help=f"runs per rate (default {RUNS})")
    args = parser.parse_args(argv or [])
    results, piper, piece = trio.run(measure, args.runs)
    completing, _ = first_piece_token()
    print(f"Streamed text over {args.runs} runs per rate — {describe()}")
    print(f"reply: {len(TOKENS)} word tokens; first piece {piece!r} completed by token "
          f"{completing + 1}; Piper alone = PiperProvider worker pool in this process\n")
    p_alone50, p_alone95 = statistics.median(piper), percentile(piper, 0.95)
    header = ("rate tok/s", "(a) from start", "(b) from token", "Piper alone", "(b)/Piper",
              "(c) longest stall", "runs w/ stall")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for rate in RATES:
        runs = results[rate]
        a = [r.from_start * 1000 for r in runs]
        b = [r.from_token * 1000 for r in runs]
        c = [r.longest_stall * 1000 for r in runs]
        stalled = sum(1 for r in runs if r.longest_stall > 0)
        print(f"| {rate} | {_pp(a)} | {_pp(b)} | {p_alone50 * 1000:.0f} / {p_alone95 * 1000:.0f} | "
              f"{statistics.median(b) / (p_alone50 * 1000):.2f} / {percentile(b, 0.95) / (p_alone95 * 1000):.2f} | "
              f"{_pp(c)} | {stalled}/{len(runs)} |")
    print("\nCells are p50 / p95 in ms (ratio: p50 / p95). Targets: (b)/Piper <= 1.1; "
          "no stall at 40 and 100 tokens/s.")
    ttfas = [r.ttfa_ms for rate in RATES for r in results[rate] if r.ttfa_ms is not None]
    if ttfas:
        print(f"Cross-check, the daemon's own utterance_finished.ttfa_ms: p50 {statistics.median(ttfas):.0f}, "
              f"p95 {percentile(ttfas, 0.95):.0f}")


def _pp(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} / {percentile(values, 0.95):.0f}"


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
