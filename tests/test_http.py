"""The HTTP face over real sockets on loopback: each route, each error status, and
`POST /v1/speak` audio reaching a WebSocket subscriber.

Port 0 for both servers, `trio.fail_after` around all I/O, no sleeps: readiness is
awaited through the WebSocket's own `hello` / `ready` events.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs
from trio_websocket import WebSocketConnection, open_websocket_url

from pipeline import __version__
from pipeline.commands import TTSProvider
from pipeline.config import Settings
from pipeline.daemon import RunningDaemon, running_daemon, serve
from pipeline.errors import ProviderFailed
from tests.support import Heard, HeldVoice, ScriptedProvider, finished, of_type, provider_set, receive_until, send, tone

BASE = Settings(port=0, http_port=0)
JSON = {"Content-Type": "application/json"}


@asynccontextmanager
async def daemon_and_client(
    settings: Settings = BASE, *providers: ScriptedProvider
) -> AsyncIterator[tuple[RunningDaemon, httpx.AsyncClient]]:
    providers = providers or (ScriptedProvider(),)
    async with running_daemon(settings, provider_set(settings, *providers)) as daemon:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.http_port}") as client:
            yield daemon, client


def ws_url(daemon: RunningDaemon, query: str = "") -> str:
    return f"ws://127.0.0.1:{daemon.port}/{query}"


async def until_session_open(ws: WebSocketConnection) -> None:
    """Return once the daemon's session is open as the broadcaster sees it."""
    heard = Heard()
    hello = await receive_until(ws, heard, of_type("hello"))
    if hello["session"] != "open":
        await receive_until(ws, heard, of_type("ready"))


async def test_health_info_and_the_web_page():
    with trio.fail_after(30):
        async with daemon_and_client() as (daemon, http):
            health = await http.get("/healthz")
            info = await http.get("/v1/info")
            page = await http.get("/")
            script = await http.get("/player.js")
    assert health.status_code == 200
    assert info.status_code == 200
    assert info.json()["version"] == __version__
    assert info.json()["ws_port"] == daemon.port
    assert info.json()["provider"] == "piper"
    assert info.json()["providers"] == ["piper", "kokoros", "openai"]
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>speechcast</title>" in page.text
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]


async def test_readyz_follows_the_session():
    with trio.fail_after(30):
        async with daemon_and_client() as (daemon, http):
            async with open_websocket_url(ws_url(daemon, "?subscribe=0")) as ws:
                await until_session_open(ws)
                ready = await http.get("/readyz")
                await send(ws, type="close")
                await receive_until(ws, Heard(), of_type("closed"))
                closed = await http.get("/readyz")
                await send(ws, type="initialize")
                await receive_until(ws, Heard(), of_type("ready"))
                reopened = await http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["provider"] == "piper"
    assert closed.status_code == 503 and "initialize" in closed.json()["reason"]
    assert reopened.status_code == 200


async def test_readyz_says_why_the_provider_cannot_be_used():
    provider = ScriptedProvider()
    provider.reason = "the voice model is missing"
    with trio.fail_after(30):
        async with daemon_and_client(BASE, provider) as (_, http):
            response = await http.get("/readyz")
    assert response.status_code == 503
    assert response.json()["reason"] == "the voice model is missing"


async def test_speak_over_http_reaches_websocket_subscribers():
    provider = ScriptedProvider(script=lambda text: [tone(4800), tone(2400, 500)])
    with trio.fail_after(30), capture_logs() as logs:
        async with daemon_and_client(BASE, provider) as (daemon, http):
            async with open_websocket_url(ws_url(daemon)) as ws:
                await until_session_open(ws)
                response = await http.post("/v1/speak", json={"text": "Over HTTP.", "speed": 1.5, "voice": "x"})
                assert response.status_code == 202
                utterance_id = response.json()["utterance_id"]
                heard = Heard()
                done = await receive_until(ws, heard, finished(utterance_id))
    assert response.json()["position"] == 0
    assert heard.of_type("utterance_started")[0]["utterance_id"] == utterance_id
    assert done["status"] == "ok"
    assert heard.pcm() == bytes(provider.produced)
    assert provider.texts == ["Over HTTP."]
    # The request is no pseudo-subscriber: only the WebSocket client ever connected.
    assert len([e for e in logs if e["event"] == "subscriber.connected"]) == 1


BAD_BODIES = [
    (b"not json", "invalid_json"),
    (b'["Hello"]', "invalid_command"),
    (b"{}", "invalid_command"),
    (b'{"text": 42}', "invalid_command"),
    (b'{"text": "   "}', "empty_text"),
    (b'{"text": "' + b"a" * 4097 + b'"}', "text_too_long"),
    (b'{"text": "hi", "speed": 9}', "invalid_command"),
    (b'{"text": "hi", "voice": 7}', "invalid_command"),
    (b'{"text": "hi", "provider": "espeak"}', "unknown_provider"),
]


async def test_bad_input_is_400_with_the_websocket_error_code():
    provider = ScriptedProvider()
    with trio.fail_after(30):
        async with daemon_and_client(BASE, provider) as (_, http):
            answers = [await http.post("/v1/speak", content=body, headers=JSON) for body, _ in BAD_BODIES]
            oversized = await http.post("/v1/speak", content=b'{"text": "' + b"a" * 70000 + b'"}', headers=JSON)
    for (body, code), answer in zip(BAD_BODIES, answers):
        assert answer.status_code == 400, body
        assert answer.json()["type"] == "error" and answer.json()["code"] == code, body
    assert oversized.status_code == 413 and oversized.json()["code"] == "text_too_long"
    assert provider.texts == []  # nothing bad reached the provider


async def test_a_control_token_is_required_when_configured():
    settings = dataclasses.replace(BASE, control_token="sesame")
    with trio.fail_after(30):
        async with daemon_and_client(settings) as (_, http):
            missing = await http.post("/v1/speak", json={"text": "Hi."})
            wrong = await http.post("/v1/speak", json={"text": "Hi."}, headers={"Authorization": "Bearer nope"})
            bearer = await http.post("/v1/speak", json={"text": "Hi."}, headers={"Authorization": "Bearer sesame"})
            query = await http.post("/v1/speak?token=sesame", json={"text": "Hi."})
    for refused in (missing, wrong):
        assert refused.status_code == 401
        assert refused.json()["code"] == "unauthorized"
        assert "sesame" not in refused.text
    assert bearer.status_code == 202 and query.status_code == 202


async def test_a_full_queue_is_429():
    provider = ScriptedProvider()
    provider.gate = trio.Event()  # the first utterance speaks until the gate opens
    settings = dataclasses.replace(BASE, max_pending=1)
    with trio.fail_after(30):
        async with daemon_and_client(settings, provider) as (daemon, http):
            async with open_websocket_url(ws_url(daemon, "?subscribe=0")) as ws:
                await until_session_open(ws)
                speaking = await http.post("/v1/speak", json={"text": "First."})
                waiting = await http.post("/v1/speak", json={"text": "Second."})
                refused = await http.post("/v1/speak", json={"text": "Third."})
                provider.gate.set()
    assert speaking.status_code == 202 and waiting.status_code == 202
    assert refused.status_code == 429
    assert refused.json()["code"] == "queue_full"
    assert refused.headers["retry-after"] == "1"


async def test_closed_session_and_unavailable_provider_are_503():
    with trio.fail_after(30):
        async with daemon_and_client() as (daemon, http):
            async with open_websocket_url(ws_url(daemon, "?subscribe=0")) as ws:
                await until_session_open(ws)
                unconfigured = await http.post("/v1/speak", json={"text": "Hi.", "provider": "openai"})
                await send(ws, type="close")
                await receive_until(ws, Heard(), of_type("closed"))
                closed = await http.post("/v1/speak", json={"text": "Hi."})
    assert unconfigured.status_code == 503 and unconfigured.json()["code"] == "provider_unavailable"
    assert closed.status_code == 503 and closed.json()["code"] == "not_initialized"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_count_what_subscribers_received_and_provider_failures():
    kokoros = ScriptedProvider(TTSProvider.KOKOROS, script=lambda text: [ProviderFailed("server down")])
    piper = ScriptedProvider(script=lambda text: [tone(4800)])
    with trio.fail_after(30):
        async with daemon_and_client(BASE, kokoros, piper) as (daemon, http):
            async with open_websocket_url(ws_url(daemon)) as ws:
                await until_session_open(ws)
                response = await http.post("/v1/speak", json={"text": "Fail over.", "provider": "kokoros"})
                heard = Heard()
                done = await receive_until(ws, heard, finished(response.json()["utterance_id"]))
                page = await http.get("/metrics")
    assert done["status"] == "ok"
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    values = samples(page.text)
    assert values[("speechcast_utterances_total", (("provider", "piper"), ("status", "ok")))] == 1
    assert values[("speechcast_provider_failures_total", (("code", "provider_failed"), ("provider", "kokoros")))] == 1
    assert values[("speechcast_chunks_sent_total", ())] == len(heard.frames)
    # Each frame is the 9-byte VOICE_DATA header plus a WAV file.
    assert values[("speechcast_bytes_sent_total", ())] == sum(9 + len(f.audio) for f in heard.frames)
    assert values[("speechcast_subscribers", ())] == 1
    assert values[("speechcast_ttfa_seconds_count", ())] == 1


async def test_a_stopping_daemon_is_not_ready_and_takes_no_more_text():
    settings = dataclasses.replace(BASE, shutdown_grace=30)
    voice = HeldVoice()
    stop = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            daemon = await nursery.start(partial(serve, settings, provider_set(settings, voice), shutdown=stop.wait))
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.http_port}") as http:
                async with open_websocket_url(ws_url(daemon)) as ws:
                    await until_session_open(ws)
                    await http.post("/v1/speak", json={"text": "Speaking."})
                    queued = (await http.post("/v1/speak", json={"text": "Queued."})).json()["utterance_id"]
                    stop.set()
                    # The queued utterance is cancelled once the daemon has begun to stop.
                    await receive_until(ws, Heard(), finished(queued))
                    ready = await http.get("/readyz")
                    refused = await http.post("/v1/speak", json={"text": "Too late."})
                    voice.release.set()
    assert ready.status_code == 503 and "shutting down" in ready.json()["reason"]
    assert refused.status_code == 503 and refused.json()["code"] == "not_initialized"
    assert voice.texts == ["Speaking."]


async def test_too_many_requests_from_one_address_are_429():
    settings = dataclasses.replace(BASE, rate_burst=2, rate_limit=0.01)
    with trio.fail_after(30):
        async with daemon_and_client(settings) as (_, http):
            answers = [await http.post("/v1/speak", json={"text": "Hi."}) for _ in range(3)]
    assert [a.status_code for a in answers] == [202, 202, 429]
    assert answers[2].json()["code"] == "rate_limited"
    assert int(answers[2].headers["retry-after"]) >= 1
