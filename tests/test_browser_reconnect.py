"""The web page's list of daemons (`?ws=URL,URL`, docs/scale-out.md): it tries them in
turn, so a listener whose daemon is gone ends up on another one. Real Chromium, as in
tests/test_browser.py (whose fixtures and helpers this uses)."""

from __future__ import annotations

from pipeline.config import Settings
from tests.broker_group import free_port
from tests.support import ScriptedProvider, provider_set
from tests.test_browser import daemon_in_thread, page, pytestmark, wait_for  # noqa: F401  (fixture, marker)

CONNECTED = "document.getElementById('connection').dataset.state === 'connected'"


def test_the_page_moves_on_to_the_next_daemon_of_its_list_when_one_is_gone(page):  # noqa: F811
    settings = Settings(port=0, http_port=0)
    gone = f"ws://127.0.0.1:{free_port()}/"  # nobody listens there
    with daemon_in_thread(settings, provider_set(settings, ScriptedProvider())) as daemon:
        live = f"ws://127.0.0.1:{daemon.port}/"
        page.goto(f"http://127.0.0.1:{daemon.http_port}/?ws={gone},{live}")
        wait_for(page, CONNECTED, timeout=30_000)
        hello = page.evaluate("() => window.speechcast.events.map((e) => e.event).find((e) => e.type === 'hello')")
        closes = page.evaluate("() => window.speechcast.log.filter((l) => l.text.includes('connection closed')).length")
    assert hello is not None and hello["session"] in ("open", "closed")
    assert closes >= 1  # the first URL was tried and failed before the second one answered
    assert page.errors == []
