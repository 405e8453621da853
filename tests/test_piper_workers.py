"""The embedded voice in worker processes: a text that crashes Piper or blows its memory
costs a worker, never the daemon; cancel kills the synthesis; lookahead uses a second
worker. Texts that can crash anything run against `speechcast serve` as a subprocess, so
the test process survives whatever happens; the rest use the real voice in-process.

Loopback only, port 0, `trio.fail_after` around all I/O; MockClock for the start rule.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import signal
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
import trio_parallel
from trio_websocket import open_websocket_url

from pipeline.commands import TTSProvider
from pipeline.config import Settings
from pipeline.daemon import running_daemon
from pipeline.errors import UnspeakableText
from pipeline.providers import piper_worker
from pipeline.providers.piper import PiperProvider, _lost_worker
from pipeline.speaking import Speaker, Utterance
from tests.serve_process import serve_process
from tests.support import (
    Heard,
    ScriptedProvider,
    finished,
    provider_set,
    receive_until,
    send,
    tone,
)

# "a." * 100 segfaults Piper's phonemizer (espeak-ng) in about 7 fresh processes out of 8
# (it reads out of bounds; whether that faults depends on the memory layout). This text is
# four such pieces of 250 characters, so at least one crashes all but ~1/4000 of the time.
CRASHING = "a." * 500
FINE = "This sentence is spoken after the trouble."
CJK = "中文字测试" * 52  # 260 characters without whitespace: pieces of 250 and 10


async def speak_and_wait(ws, heard: Heard, text: str) -> dict:
    await send(ws, type="send_message", text=text)
    accepted = await receive_until(ws, heard, lambda e: e["type"] == "accepted")
    return await receive_until(ws, heard, finished(accepted["utterance_id"]))


def errors_of(heard: Heard, finished_event: dict) -> list[dict]:
    return [e for e in heard.of_type("error") if e.get("utterance_id") == finished_event["utterance_id"]]


# ------------------------------------------------------------------- the daemon survives


async def test_a_text_that_crashes_the_embedded_voice_costs_a_worker_not_the_daemon():
    with trio.fail_after(90):
        async with serve_process("--fallback", "") as daemon:
            async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/") as ws:
                heard = Heard()
                crashed = await speak_and_wait(ws, heard, CRASHING)
                spoken = await speak_and_wait(ws, heard, FINE)
            assert daemon.process.returncode is None  # still serving
            daemon.signal(signal.SIGTERM)
            assert await daemon.exit_code() == 0
    assert crashed["status"] in ("failed", "partial")  # failed when the first piece crashed
    errors = errors_of(heard, crashed)
    assert errors and all(e["code"] == "provider_failed" for e in errors)
    assert any("crashed on this text" in e["message"] for e in errors)
    assert spoken["status"] == "ok" and spoken["chunks"] > 0


async def test_text_without_spaces_is_cut_and_a_worker_over_its_memory_bound_is_replaced():
    # Before: 256 CJK characters were one piece and took the daemon to 1.9 GB RSS. Now
    # the text is cut at 250 characters and the model runs at 320 phonemes; 600 MB is
    # enough for English pieces but not for the CJK piece's runs (~1.7 GB of address
    # space): the bound must hold inside the worker, and the daemon go on.
    with trio.fail_after(120):
        async with serve_process("--fallback", "", "--piper-worker-memory-mb", "600") as daemon:
            async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/") as ws:
                heard = Heard()
                blown = await speak_and_wait(ws, heard, CJK)
                spoken = await speak_and_wait(ws, heard, FINE)
            assert daemon.process.returncode is None
    assert blown["status"] in ("failed", "partial")
    assert any("memory" in e["message"] or "crashed" in e["message"] for e in errors_of(heard, blown))
    assert spoken["status"] == "ok"


# ----------------------------------------------------------------------- cancel kills


async def test_cancel_kills_the_synthesis_and_the_next_utterance_does_not_wait_for_it():
    # Old behaviour: the cancelled piece went on in an abandoned thread that held the
    # voice for ~10 s more, and the next utterance waited for it.
    settings = Settings(port=0, http_port=0, fallback=())
    piper = PiperProvider(workers=2)
    try:
        with trio.fail_after(60):
            async with running_daemon(settings, provider_set(settings, piper)) as daemon, open_websocket_url(
                f"ws://127.0.0.1:{daemon.port}/"
            ) as ws:
                heard = Heard()
                await speak_and_wait(ws, heard, "Warm up the voice first.")  # workers loaded
                before = {p.pid for p in multiprocessing.active_children()}
                await send(ws, type="send_message", text=CJK)
                accepted = await receive_until(ws, heard, lambda e: e["type"] == "accepted")
                while piper._context.statistics().running_workers == 0:
                    await trio.sleep(0.01)  # poll: synthesis is in a separate process
                await send(ws, type="cancel")
                cancelled = await receive_until(ws, heard, finished(accepted["utterance_id"]))
                with trio.fail_after(8):  # a fraction of the ~10 s the killed piece needed
                    spoken = await speak_and_wait(ws, heard, FINE)
                after = {p.pid for p in multiprocessing.active_children()}
    finally:
        with trio.CancelScope(shield=True):
            await piper.aclose()
    assert cancelled["status"] == "cancelled" and spoken["status"] == "ok"
    assert before - after, "the worker of the cancelled piece was killed"


# ---------------------------------------------------------------------- units


def test_a_long_sentence_of_phonemes_is_cut_into_runs_of_bounded_length():
    words = [list("hɛloʊ"), list("wɜːld"), list("x" * 900)]
    phonemes = [p for word in words * 40 for p in word + [" "]]
    runs = piper_worker._cut(phonemes)
    assert [p for run in runs for p in run] == phonemes
    assert all(0 < len(run) <= piper_worker.MAX_PHONEMES for run in runs)


async def test_a_worker_lost_to_a_signal_is_the_texts_fault_not_the_providers():
    # A stand-in job that segfaults in the worker: the daemon-side provider survives it.
    provider = PiperProvider(workers=1)
    await provider.open()
    try:
        with trio.fail_after(60):
            with pytest.raises(trio_parallel.BrokenWorkerError) as crashed:
                await provider._context.run_sync(_segfault, limiter=provider._limiter)
            error = _lost_worker(crashed.value)
            assert isinstance(error, UnspeakableText) and not error.provider_fault
            assert "SIGSEGV" in error.message
            spoken = [b async for b in provider.synthesize(FINE, None, None)]
            assert b"".join(spoken)
    finally:
        with trio.CancelScope(shield=True):
            await provider.aclose()


def _segfault() -> None:
    import ctypes

    ctypes.string_at(0)


# ------------------------------------------------------------- lookahead side by side


class WholePieces(ScriptedProvider):
    """A provider that, like Piper's workers, returns each piece whole after 1 s and can
    run two at once; remembers when each piece started and ended."""

    def __init__(self) -> None:
        super().__init__(TTSProvider.PIPER)
        self.max_parallel = 2
        self.log: list[tuple[str, str, float]] = []

    async def synthesize(self, text: str, voice, speed) -> AsyncIterator[bytes]:
        self.log.append(("start", text, trio.current_time()))
        await trio.sleep(1)
        self.log.append(("end", text, trio.current_time()))
        yield tone(480)


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def test_lookahead_on_two_workers_runs_later_pieces_in_parallel(autojump_clock):
    text = "The first sentence is here. The second sentence comes next. The third one ends it. The fourth closes."
    provider = WholePieces()
    settings = dataclasses.replace(Settings(fallback=()), lookahead=1)
    speaker = Speaker(provider_set(settings, provider), sample_rate=24000, fallback=(), lookahead=1, short_first_piece=False)
    out: list = []

    async def emit(item):
        out.append(item)

    with trio.fail_after(60):
        status = await speaker.speak(Utterance("u1", text, None, None, None, owner=1, received_at=0.0), TTSProvider.PIPER, emit)
    starts = {t[:10]: when for kind, t, when in provider.log if kind == "start"}
    ends = {t[:10]: when for kind, t, when in provider.log if kind == "end"}
    assert status == "ok"
    assert starts["The second"] >= ends["The first "]  # first audio never shares the cores
    assert starts["The third "] < ends["The second"]  # later pieces overlap
    assert max(ends.values()) < 4  # serial would take 4 s
