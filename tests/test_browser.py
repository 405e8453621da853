"""The web page in a real browser: Debian's Chromium driven by Playwright's sync API,
against a daemon (real Piper voice, ports 0) running under trio in a background thread.

Playwright's async API is asyncio-only, so these are plain (non-trio) test functions and
the daemon gets its own trio loop in a thread. Every wait is for a condition in the page
(`wait_for`), never a sleep. Set SPEECHCAST_SCREENSHOT=path to also save a
screenshot of the page mid-utterance (that is how docs/screenshot.png is made).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from playwright import sync_api

from pipeline.config import Settings
from pipeline.daemon import RunningDaemon, serve
from pipeline.providers.registry import ProviderSet
from tests.support import RecordingPiper, provider_set

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps dialling out of a closed network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]
WAIT_MS = 60_000
TEXT = "The quick brown fox jumps over the lazy dog. Then it naps in the warm afternoon sun, quite pleased."
# Tolerance for "contiguous": well under one sample at 24 kHz would be too strict for
# floating point, 1 ms is far below anything audible as a gap or a doubled sound.
CONTIGUOUS_S = 0.001

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (`make test` installs it)")


@contextmanager
def daemon_in_thread(settings: Settings, providers: ProviderSet | None = None) -> Iterator[RunningDaemon]:
    """Run the real daemon under trio in a background thread for the block's duration."""
    handed: queue.Queue[Any] = queue.Queue()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            daemon = await nursery.start(serve, settings, providers)
            handed.put((daemon, trio.lowlevel.current_trio_token(), nursery.cancel_scope))

    def main() -> None:
        try:
            trio.run(run)
        except BaseException as e:  # hand start-up failures to the test
            handed.put(e)

    thread = threading.Thread(target=main, name="speechcast-daemon", daemon=True)
    thread.start()
    item = handed.get(timeout=60)
    if isinstance(item, BaseException):
        raise item
    daemon, token, scope = item
    try:
        yield daemon
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def daemon() -> Iterator[RunningDaemon]:
    with daemon_in_thread(Settings(port=0, http_port=0)) as running:
        yield running


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 900, "height": 640},
        )
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        try:
            yield page
        finally:
            context.close()


def wait_for(page: Any, expression: str, timeout: int) -> None:
    """Wait in the page until `expression` is true, checking every 20 ms.

    Playwright's `wait_for_function` compiles its predicate with eval, which the page's
    Content-Security-Policy forbids (as it should); `evaluate` is exempt, so the polling
    loop runs in a promise it returns, with the expression compiled as part of it.
    """
    page.evaluate(
        f"""() => new Promise((resolve, reject) => {{
            const deadline = performance.now() + {timeout};
            const check = () => {{
                if ({expression}) resolve(true);
                else if (performance.now() > deadline) reject(new Error("timed out waiting for: " + {json.dumps(expression)}));
                else setTimeout(check, 20);
            }};
            check();
        }})"""
    )


def open_page(page: Any, daemon: RunningDaemon, query: str) -> None:
    page.goto(f"http://127.0.0.1:{daemon.http_port}/{query}")
    wait_for(page, "document.getElementById('connection').dataset.state === 'connected'", timeout=WAIT_MS)


def speak(page: Any, text: str) -> None:
    page.fill("#text", text)
    page.click("#speak")


def page_state(page: Any) -> dict[str, Any]:
    return page.evaluate(
        """() => ({
            events: window.speechcast.events.map((e) => e.event),
            timeline: window.speechcast.timeline,
            decodeErrors: window.speechcast.decodeErrors,
            log: window.speechcast.log,
            playing: window.speechcast.player.playing(),
        })"""
    )


def one(events: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matching = [e for e in events if e["type"] == kind]
    assert len(matching) == 1, (kind, matching)
    return matching[0]


def assert_played(state: dict[str, Any], started: dict[str, Any], done: dict[str, Any], *, gapless: bool = True) -> None:
    """The page decoded and scheduled every chunk of the utterance in order, never two at
    once, and (`gapless`) each right where the previous one ends. A streamed utterance may
    have gaps: its text, and so its audio, arrives at typing speed."""
    chunks = [c for c in state["timeline"] if c["utteranceId"] == done["utterance_id"]]
    # Every chunk the daemon sent was decoded and scheduled.
    assert [c["chunkId"] for c in chunks] == list(range(started["first_chunk_id"], done["last_chunk_id"] + 1))
    assert len(chunks) == done["chunks"]
    assert all(c["ok"] for c in chunks)
    assert state["decodeErrors"] == []
    # Each buffer starts where the previous one ends (or later, when not gapless): no overlap.
    for before, after in itertools.pairwise(chunks):
        gap = after["start"] - (before["start"] + before["duration"])
        assert gap >= -CONTIGUOUS_S and (gap <= CONTIGUOUS_S or not gapless), (before, after)
    # What was scheduled is as long as what the daemon says it sent.
    assert abs(sum(c["duration"] for c in chunks) * 1000 - done["audio_ms"]) <= 1


@pytest.mark.parametrize("query", ["?format=wav", "?format=pcm&compress=1"], ids=["wav", "pcm-compressed"])
def test_the_page_plays_an_utterance_without_gaps(daemon, page, query):
    open_page(page, daemon, query)
    speak(page, TEXT)
    wait_for(page, "window.speechcast.log.some((line) => line.kind === 'done')", timeout=WAIT_MS)
    state = page_state(page)

    accepted = one(state["events"], "accepted")
    started = one(state["events"], "utterance_started")
    done = one(state["events"], "utterance_finished")
    assert started["utterance_id"] == done["utterance_id"] == accepted["utterance_id"]
    assert done["status"] == "ok" and done["ttfa_ms"] > 0
    assert started["format"] == ("pcm" if "pcm" in query else "wav")

    assert_played(state, started, done)
    # The event log shows the utterance with its TTFA.
    finished_lines = [line["text"] for line in state["log"] if line["utteranceId"] == done["utterance_id"]]
    assert any(f"finished ok: {done['chunks']} chunks" in t and "TTFA" in t for t in finished_lines)
    assert page.errors == []


# Feeds the page's player PCM frames of silence by hand: `feed(ids_and_ms)` gives each chunk
# id its length in ms, and returns where each chunk was scheduled (null: held back).
FEED_PLAYER = """async ([utterance, chunks, finish]) => {
    const player = window.speechcast.player;
    const frame = (chunkId, ms) => {
        const bytes = new Uint8Array(9 + ms * 24 * 2);
        const view = new DataView(bytes.buffer);
        view.setUint32(0, 2, true);
        view.setUint32(4, chunkId, true);
        return bytes.buffer;
    };
    await player.started({ utterance_id: utterance, sample_rate: 24000 });
    const seen = [];
    for (const [chunkId, ms] of chunks) {
        await player.frame(frame(chunkId, ms));
        seen.push(player.timeline.filter((c) => c.utteranceId === utterance).map((c) => c.start));
    }
    if (finish) await player.finished({ utterance_id: utterance, status: "ok", audio_ms: 0 });
    return seen;
}"""


def test_the_player_starts_once_enough_sound_is_in_hand_not_on_a_short_first_chunk(daemon, page):
    open_page(page, daemon, "?format=pcm")
    # A 40 ms first chunk alone would leave the next one 140 ms to arrive and decode: held.
    seen = page.evaluate(FEED_PLAYER, ["a", [[0, 40], [1, 80], [2, 160], [3, 320]], True])
    assert seen[0] == [None]
    assert seen[1] == [None, None]
    # 280 ms in hand: all three start, one after the other; the next follows directly.
    starts = seen[3]
    assert None not in starts
    assert [round(b - a, 3) for a, b in itertools.pairwise(starts)] == [0.04, 0.08, 0.16]
    # After a silence, an utterance that ends short is played at its end, whatever is in hand.
    wait_for(page, "window.speechcast.player.playing() === 0", timeout=WAIT_MS)
    seen = page.evaluate(FEED_PLAYER, ["b", [[4, 40]], True])
    assert seen == [[None]]
    assert page.evaluate("window.speechcast.timeline.at(-1).start") is not None
    # A lone short chunk (a provider trickling audio) is not held for ever.
    wait_for(page, "window.speechcast.player.playing() === 0", timeout=WAIT_MS)
    page.evaluate(FEED_PLAYER, ["c", [[5, 40]], False])
    wait_for(page, "window.speechcast.timeline.at(-1).start !== null", timeout=WAIT_MS)
    assert page.errors == []


def test_the_page_decodes_every_opus_chunk_with_webcodecs_and_plays_it_gaplessly(daemon, page):
    # No ?format: a browser with WebCodecs asks for Opus by itself.
    open_page(page, daemon, "")
    speak(page, TEXT)
    wait_for(page, "window.speechcast.log.some((line) => line.kind === 'done')", timeout=WAIT_MS)
    state = page_state(page)
    started = one(state["events"], "utterance_started")
    done = one(state["events"], "utterance_finished")
    assert done["status"] == "ok"
    assert (started["format"], started["codec"], started["pre_skip"]) == ("opus", "opus", 312)
    assert_played(state, started, done)  # the last buffer ends where the announced audio does
    # The audio bytes the page shows: Opus is a small fraction of the PCM it stands for.
    received = page.evaluate("window.speechcast.audioBytesReceived")
    assert received * 10 < done["audio_ms"] * started["sample_rate"] * 2 / 1000
    assert "opus:" in page.inner_text("#bytes") and "received" in page.inner_text("#bytes")
    assert page.errors == []


def test_a_browser_without_webcodecs_falls_back_to_pcm(daemon, page):
    page.add_init_script("delete window.AudioDecoder; delete window.EncodedAudioChunk;")
    open_page(page, daemon, "?format=opus")
    speak(page, "No WebCodecs here, so plain samples it is.")
    wait_for(page, "window.speechcast.log.some((line) => line.kind === 'done')", timeout=WAIT_MS)
    state = page_state(page)
    started = one(state["events"], "utterance_started")
    done = one(state["events"], "utterance_finished")
    assert started["format"] == "pcm" and "codec" not in started
    assert_played(state, started, done)
    assert page.errors == []


def test_cancel_stops_the_sound_and_the_daemon_says_cancelled(daemon, page):
    open_page(page, daemon, "")
    speak(page, " ".join([TEXT] * 40)[:4000])  # synthesis outlasts the click by seconds
    wait_for(page, "window.speechcast.player.playing() > 0", timeout=WAIT_MS)
    page.click("#cancel")
    wait_for(
        page,
        "window.speechcast.events.some((e) => e.event.type === 'utterance_finished')", timeout=WAIT_MS
    )
    wait_for(page, "window.speechcast.events.some((e) => e.event.type === 'cancelled')", timeout=WAIT_MS)
    state = page_state(page)
    done = one(state["events"], "utterance_finished")
    assert done["status"] == "cancelled"
    assert one(state["events"], "cancelled")["utterance_ids"] == [done["utterance_id"]]
    assert state["playing"] == 0
    assert page.errors == []


def test_type_as_you_go_speaks_exactly_what_was_typed(page):
    piper = RecordingPiper()
    settings = Settings(port=0, http_port=0)
    with daemon_in_thread(settings, provider_set(settings, piper)) as daemon:
        sent: list[dict[str, Any]] = []
        page.on("websocket", lambda ws: ws.on("framesent", lambda frame: sent.append(json.loads(frame))))
        open_page(page, daemon, "")
        page.check("#as-you-type")
        page.click("#text")
        page.keyboard.type(TEXT, delay=30)  # a person typing, keystroke by keystroke
        page.keyboard.press("Enter")
        wait_for(page, "window.speechcast.log.some((line) => line.kind === 'done')", timeout=WAIT_MS)
        state = page_state(page)
        box = page.input_value("#text")

    accepted = one(state["events"], "accepted")
    started = one(state["events"], "utterance_started")
    done = one(state["events"], "utterance_finished")
    assert accepted["streaming"] is True
    assert started["utterance_id"] == done["utterance_id"] == accepted["utterance_id"]
    assert done["status"] == "ok" and done["chunks"] > 0
    assert_played(state, started, done, gapless=False)  # the page chose opus
    assert box == ""  # Enter ended the text and cleared the box
    # The page streamed it: one text_start, appends while typing, one text_end, and the
    # parts put together are exactly the typed text.
    kinds = [m["type"] for m in sent]
    assert kinds[0] == "text_start" and kinds[-1] == "text_end" and kinds.count("text_start") == 1
    assert kinds.count("text_append") >= 2, kinds
    assert "".join(m.get("text", "") for m in sent) == TEXT
    # The voice was asked for the typed words, all of them, in order, once.
    assert " ".join(text for text, _ in piper.pieces).split() == TEXT.split()
    assert page.errors == []


@pytest.mark.skipif(not os.environ.get("SPEECHCAST_SCREENSHOT"), reason="set SPEECHCAST_SCREENSHOT=path to take it")
def test_screenshot_for_the_readme(daemon, page):
    """Not a check: the picture in docs/, one utterance done and one mid-way."""
    open_page(page, daemon, "")
    speak(page, "Hello from speechcast.")
    wait_for(page, "window.speechcast.log.some((line) => line.kind === 'done')", timeout=WAIT_MS)
    speak(page, TEXT)
    wait_for(page, "window.speechcast.log.filter((l) => l.kind === 'speaking').length === 2", timeout=WAIT_MS)
    wait_for(page, "parseFloat(document.getElementById('level').style.width) > 20", timeout=WAIT_MS)
    page.screenshot(path=os.environ["SPEECHCAST_SCREENSHOT"])
    # Let the voice finish, so no synthesis thread is left running at teardown.
    wait_for(page, "window.speechcast.log.filter((l) => l.kind === 'done').length === 2", timeout=WAIT_MS)
