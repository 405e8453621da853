"""What `format=opus` saves and costs: bytes per second of speech on the wire for every
format, and the time the daemon spends encoding Opus per chunk.

Runs the daemon in this process with the embedded voice (real speech) and four
subscribers on the same utterances: wav, pcm, pcm with compress=1, and opus. Counts every
VOICE_DATA byte each receives (the 9-byte frame header included) per second of speech.
Then encodes the same speech again, chunk by chunk as the chunker cuts it (40, 80, 160
ms, then chunk_ms), timing each chunk's encoding (the CPU the broadcaster spends) and
the longest single 20 ms frame; and how much of that the event loop itself spends (the
daemon encodes in a worker thread). Target: opus at most 1/10 of pcm's bytes.

    python -m bench opus
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import trio
from trio_websocket import open_websocket_url

from pipeline import opus, protocol
from pipeline.audio import ms_to_bytes
from pipeline.config import Settings
from pipeline.daemon import running_daemon

TEXTS = (
    "Opus is what every real-time voice system sends. It carries speech in a fraction of the bytes.",
    "The quick brown fox jumps over the lazy dog. Then it naps in the warm afternoon sun, quite pleased.",
    "A listener on a phone network should not stutter, and a room of two thousand should not need a data centre.",
)
VARIANTS = {"wav": "", "pcm": "?format=pcm", "pcm+zlib": "?format=pcm&compress=1", "opus": "?format=opus"}
TARGET_RATIO = 10


async def wire_bytes(settings: Settings) -> tuple[dict[str, int], float, bytes]:
    """Bytes each variant received for TEXTS, the seconds of speech, and the speech (PCM)."""
    received = dict.fromkeys(VARIANTS, 0)
    speech = bytearray()
    audio_ms = 0
    async with running_daemon(settings) as daemon:
        ready = trio.Semaphore(0)

        async def subscriber(name: str, query: str) -> None:
            nonlocal audio_ms
            async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/{query}", max_message_size=2**24) as ws:
                await ws.get_message()  # hello
                ready.release()
                done = 0
                while done < len(TEXTS):
                    message = await ws.get_message()
                    if isinstance(message, bytes):
                        received[name] += len(message)
                        if name == "pcm":
                            speech.extend(protocol.decode_voice_frame(message).audio)
                    elif json.loads(message)["type"] == "utterance_finished":
                        done += 1
                        if name == "pcm":
                            audio_ms += json.loads(message)["audio_ms"]

        async with trio.open_nursery() as nursery:
            for name, query in VARIANTS.items():
                nursery.start_soon(subscriber, name, query)
            for _ in VARIANTS:
                await ready.acquire()
            async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/?subscribe=0") as control:
                for text in TEXTS:
                    await control.send_message(json.dumps({"type": "send_message", "text": text}))
    return received, audio_ms / 1000, bytes(speech)


def encode_times(settings: Settings, utterances: list[bytes]) -> dict[int, tuple[list[float], float]]:
    """Per chunk duration (ms): the CPU time of each chunk's encoding (ms), and of the
    longest single 20 ms frame (ms), for each utterance cut as the chunker cuts it. CPU
    time, not wall time: other processes on a busy machine do not count."""
    out: dict[int, tuple[list[float], float]] = {}
    for speech in utterances:
        steps = [*settings.first_chunks_ms]
        encoder = opus.OpusEncoder(settings.sample_rate, settings.opus_bitrate)
        at = 0
        while at < len(speech):
            ms = steps.pop(0) if steps else settings.chunk_ms
            size = ms_to_bytes(ms, settings.sample_rate)
            pcm, at = speech[at : at + size], at + size
            final = at >= len(speech)
            began = time.thread_time()
            longest = 0.0
            for frame in encoder.frames(pcm, final=final):
                frame_began = time.thread_time()
                encoder.encode_frame(frame)
                longest = max(longest, time.thread_time() - frame_began)
            if final:
                encoder.flush()
            key = ms if not final else -1  # the final chunk (any length, with the flush)
            times, worst = out.get(key, ([], 0.0))
            times.append((time.thread_time() - began) * 1000)
            out[key] = (times, max(worst, longest * 1000))
    return out


async def loop_lateness(settings: Settings, speech: bytes, mode: str, tick: bool = True) -> tuple[float, float, float]:
    """While `speech` is encoded chunk by chunk as the broadcaster does (`thread`:
    opus.encode_chunk in a worker thread; `loop`: on the loop, yielding after each 20 ms
    frame; `idle`: nothing encoded): the event loop thread's own CPU per chunk (ms), and
    how late a 1 ms timer on the loop wakes up (p99, max, ms; the machine's noise too)."""
    late: list[float] = []
    loop_cpu = 0.0
    done = trio.Event()

    async def ticker() -> None:
        while tick and not done.is_set():
            began = time.perf_counter()
            await trio.sleep(0.001)
            late.append((time.perf_counter() - began) * 1000 - 1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        encoder = opus.OpusEncoder(settings.sample_rate, settings.opus_bitrate)
        size = ms_to_bytes(settings.chunk_ms, settings.sample_rate)
        for at in range(0, len(speech), size):
            pcm, final = speech[at : at + size], at + size >= len(speech)
            cpu_began = time.thread_time()
            if mode == "thread":
                await opus.encode_chunk(encoder, pcm, final=final)
            elif mode == "loop":
                for frame in encoder.frames(pcm, final=final):
                    encoder.encode_frame(frame)
                    await trio.lowlevel.checkpoint()
            loop_cpu += time.thread_time() - cpu_began
            await trio.sleep(0.004)  # the fan-out of the chunk, roughly, before the next one
        done.set()
    chunks = -(-len(speech) // size)
    return loop_cpu / chunks * 1000, float(np.percentile(late, 99)) if late else 0.0, max(late, default=0.0)


def main() -> None:
    settings = Settings(port=0, http_port=0)
    received, seconds, speech = trio.run(wire_bytes, settings)
    print(f"bytes per second of speech ({seconds:.1f} s of Piper speech, {settings.sample_rate} Hz, "
          f"chunks {list(settings.first_chunks_ms)} then {settings.chunk_ms} ms, opus_bitrate {settings.opus_bitrate}):\n")
    print(f"| {'format':<9} | {'bytes/s':>8} | {'kbit/s':>7} | {'vs pcm':>7} | {'2000 listeners':>14} |")
    print(f"|{'-' * 11}|{'-' * 10}|{'-' * 9}|{'-' * 9}|{'-' * 16}|")
    for name, total in received.items():
        rate = total / seconds
        print(f"| {name:<9} | {rate:>8.0f} | {rate * 8 / 1000:>7.1f} | {total / received['pcm']:>7.3f} | "
              f"{rate * 8 * 2000 / 1e6:>9.1f} Mbit/s |")
    ratio = received["pcm"] / received["opus"]
    print(f"\nopus = 1/{ratio:.1f} of pcm; target 1/{TARGET_RATIO} -> {'met' if ratio >= TARGET_RATIO else 'NOT met'}")

    # The same speech as several utterances gives steadier figures.
    utterances = [speech] * 5
    times = encode_times(settings, utterances)
    total_ms = sum(sum(t) for t, _ in times.values())
    print("\nopus encoding per chunk (libopus via PyAV; CPU time of the encoding, one thread):\n")
    print(f"| {'chunk':>6} | {'chunks':>6} | {'p50 ms':>7} | {'p99 ms':>7} | {'max ms':>7} | {'longest frame ms':>16} |")
    print(f"|{'-' * 8}|{'-' * 8}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 18}|")
    for ms in sorted(times, key=lambda ms: ms if ms > 0 else 10**9):
        chunk_times, longest = times[ms]
        p99 = float(np.percentile(chunk_times, 99))
        label = f"{ms:>4}ms" if ms > 0 else " final"
        print(f"| {label} | {len(chunk_times):>6} | {statistics.median(chunk_times):>7.3f} | {p99:>7.3f} | "
              f"{max(chunk_times):>7.3f} | {longest:>16.3f} |")
    audio_s = len(speech) * len(utterances) / 2 / settings.sample_rate
    print(f"\nencoding costs {total_ms / 1000 / audio_s * 100:.2f} % of one core while speaking "
          f"({total_ms:.0f} ms for {audio_s:.1f} s of speech)")

    print("\nthe event loop while 200 ms chunks are encoded: its own CPU per chunk, and the lateness")
    print("of a 1 ms timer on it (p99, max: on a busy machine this is mostly the machine's noise)\n")
    print(f"| {'where the encoding runs':<38} | {'loop CPU/chunk ms':>17} | {'late p99 ms':>11} | {'max ms':>7} |")
    print(f"|{'-' * 40}|{'-' * 19}|{'-' * 13}|{'-' * 9}|")
    for mode, label in (("idle", "nothing encoded (the machine's noise)"), ("loop", "on the loop, yielding per 20 ms frame"),
                        ("thread", "worker thread (what the daemon does)")):
        cpu = trio.run(loop_lateness, settings, speech, mode, False)[0]  # without the timer's own CPU
        _, p99, worst = trio.run(loop_lateness, settings, speech, mode)
        print(f"| {label:<38} | {cpu:>17.3f} | {p99:>11.3f} | {worst:>7.3f} |")


if __name__ == "__main__":
    main()
