"""docs/operations.md is the catalogue operators monitor with: every log event the code
can emit, and every metric DESIGN.md names, must be in it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUIDE = (ROOT / "docs" / "operations.md").read_text()
# log.info("some.event", ...) with the name possibly on the next line.
LOG_CALL = re.compile(r"\blog\.(?:debug|info|warning|error|exception)\(\s*\"([a-z_]+\.[a-z_]+)\"")
METRICS = (
    "speechcast_utterances_total",
    "speechcast_ttfa_seconds",
    "speechcast_chunks_sent_total",
    "speechcast_bytes_sent_total",
    "speechcast_subscribers",
    "speechcast_provider_failures_total",
)


def logged_events() -> set[str]:
    sources = [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("actors/*.py")]
    return {name for path in sources for name in LOG_CALL.findall(path.read_text())}


def test_every_log_event_in_the_code_is_in_the_catalogue():
    events = logged_events()
    assert {"daemon.started", "utterance.finished", "daemon.stopped"} <= events  # the scan works
    missing = sorted(name for name in events if f"`{name}`" not in GUIDE)
    assert missing == []


def test_every_metric_of_the_design_is_listed():
    assert [name for name in METRICS if f"`{name}`" not in GUIDE] == []
