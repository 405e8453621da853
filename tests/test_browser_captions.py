"""Live captions and the mouth in a real browser (issue 13): while the page plays an
utterance, the highlighted word is the word whose audio is playing, and the mouth shows
the viseme of that moment.

The page's AudioContext clock is sampled several times during playback. For each sample
the expected word is worked out here, in Python, from the chunks' scheduled start times
(the player's timeline) and the `words`/`visemes` events the page received, and compared
with what the DOM shows. Every wait is for a condition in the page, never a sleep.
"""

from __future__ import annotations

from typing import Any

from tests.test_browser import CHROMIUM, TEXT, WAIT_MS, daemon, open_page, page, speak, wait_for  # noqa: F401

SAMPLE_MS = (250, 800, 1400, 2000, 2600, 3200)


def snapshot_after(tab: Any, ms: int) -> dict[str, Any]:
    """Wait until the utterance has played `ms`, then read the clock, the player's
    schedule and what the page shows, all in one turn of the page's event loop."""
    return tab.evaluate(
        f"""() => new Promise((resolve, reject) => {{
            const deadline = performance.now() + {WAIT_MS};
            const check = () => {{
                const now = window.speechcast.captions.update();
                if (now.utteranceMs !== null && now.utteranceMs >= {ms}) {{
                    resolve({{
                        contextTime: now.contextTime,
                        utteranceId: now.utteranceId,
                        chunks: window.speechcast.timeline.filter((c) => c.utteranceId === now.utteranceId)
                            .map((c) => ({{start: c.start, duration: c.duration}})),
                        highlighted: document.querySelector("#captions .word.current")?.textContent ?? null,
                        mouth: document.getElementById("mouth-gap").dataset.viseme,
                    }});
                }} else if (performance.now() > deadline) reject(new Error("playback never reached {ms} ms: "
                    + JSON.stringify({{now, log: window.speechcast.log.map((l) => l.text),
                                      chunks: window.speechcast.timeline.length}})));
                else setTimeout(check, 5);
            }};
            check();
        }})"""
    )


def test_the_highlighted_word_is_the_one_being_heard(daemon, page):  # noqa: F811
    open_page(page, daemon, "")
    speak(page, TEXT)
    samples = [snapshot_after(page, ms) for ms in SAMPLE_MS]
    wait_for(page, "window.speechcast.log.some((line) => line.kind === 'done')", timeout=WAIT_MS)
    events = page.evaluate("() => window.speechcast.events.map((e) => e.event)")
    assert page.errors == []
    for sample in samples:
        # Where the clock is in the utterance's audio, from the player's own schedule.
        played, offset = None, 0.0
        for chunk in sample["chunks"]:
            if chunk["start"] is not None and chunk["start"] <= sample["contextTime"]:
                played = offset + min(sample["contextTime"] - chunk["start"], chunk["duration"])
            offset += chunk["duration"]
        assert played is not None
        ms = played * 1000
        words = [w for e in events if e["type"] == "words" and e["utterance_id"] == sample["utteranceId"] for w in e["words"]]
        visemes = [v for e in events if e["type"] == "visemes" and e["utterance_id"] == sample["utteranceId"] for v in e["visemes"]]
        said = [w for w in words if w["start_ms"] <= ms]
        assert said, (ms, words[:2])
        assert sample["highlighted"] == said[-1]["word"], (ms, sample["highlighted"], said[-1])
        assert sample["mouth"] == next(v["viseme"] for v in visemes if v["start_ms"] <= ms < v["end_ms"])
    # The samples walked through the text: several different words were highlighted.
    assert len({s["highlighted"] for s in samples}) >= 4
