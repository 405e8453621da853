"""What a hostile or broken client can send at the edge (issue 10, found items 1, 3, 6,
7 and 8), and what it must get back: an error with a code, a 4xx, or the documented
close, while the daemon goes on serving everyone.

The daemon that once died of a long number runs as a subprocess, so a regression fails
the test and not the test process. The rest run in-process on loopback, port 0, with
`trio.fail_after` around all I/O.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
import trio.testing
from structlog.testing import capture_logs
from trio_websocket import open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request

from pipeline.config import Settings
from pipeline.daemon import RunningDaemon, running_daemon
from tests.serve_process import serve_process
from tests.support import Heard, ScriptedProvider, finished, of_type, provider_set, receive_until, send

BASE = Settings(port=0, http_port=0)
JSON = {"Content-Type": "application/json"}
CONTROL, LISTEN = "control-secret-1", "listen-secret-2"
# Past Python's 4300-digit limit for int(): json.loads raises a plain ValueError.
HUGE_NUMBER = "9" * 5000


@asynccontextmanager
async def daemon_and_http(
    settings: Settings = BASE, provider: ScriptedProvider | None = None
) -> AsyncIterator[tuple[RunningDaemon, httpx.AsyncClient]]:
    provider = provider or ScriptedProvider()
    async with running_daemon(settings, provider_set(settings, provider)) as daemon:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.http_port}") as http:
            yield daemon, http


def ws_url(port: int, query: str = "") -> str:
    return f"ws://127.0.0.1:{port}/{query}"


# ---------------------------------------------------------------- item 1: a number too long


async def test_a_5000_digit_number_does_not_take_the_daemon_down():
    env = {"SPEECHCAST_CONTROL_TOKEN": CONTROL, "SPEECHCAST_LISTEN_TOKEN": LISTEN}
    message = '{"type":"send_message","text":"hi","speed":' + HUGE_NUMBER + "}"
    with trio.fail_after(60):
        async with serve_process(env=env) as daemon:
            async with open_websocket_url(ws_url(daemon.port, f"?token={LISTEN}")) as listener:
                heard = Heard()
                await receive_until(listener, heard, of_type("hello"))
                await listener.send_message(message)
                # A listen-only connection is refused before its message is parsed.
                assert (await receive_until(listener, heard, of_type("error")))["code"] == "unauthorized"
                async with open_websocket_url(ws_url(daemon.port, f"?token={CONTROL}&subscribe=0")) as control:
                    await receive_until(control, Heard(), of_type("hello"))
                    await control.send_message(message)
                    assert (await receive_until(control, Heard(), of_type("error")))["code"] == "invalid_json"
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.http_port}") as http:
                spoken = await http.post(
                    "/v1/speak",
                    content='{"text":"hi","speed":' + HUGE_NUMBER + "}",
                    headers={**JSON, "Authorization": f"Bearer {CONTROL}"},
                )
                health = await http.get("/healthz")
            # Still serving: a fresh connection is greeted.
            async with open_websocket_url(ws_url(daemon.port, f"?token={LISTEN}")) as fresh:
                assert (await receive_until(fresh, Heard(), of_type("hello")))["type"] == "hello"
    assert spoken.status_code == 400 and spoken.json()["code"] == "invalid_json"
    assert health.status_code == 200
    assert daemon.process.returncode is None or daemon.process.returncode < 0  # killed by us, not exited


# ---------------------------------------------------------------- item 3: text no voice can speak


UNSPEAKABLE = [
    ("\u200b\u200c\u200d\u2060", "empty_text"),  # only zero-width characters
    ("Hello\u0000world", "invalid_command"),  # a NUL
    ("half a pair \ud800 here", "invalid_command"),  # a lone surrogate (from a JSON escape)
    ("bell \u0007", "invalid_command"),
]


async def test_texts_no_voice_can_speak_are_refused_over_websocket_and_http():
    provider = ScriptedProvider()
    with trio.fail_after(30):
        async with daemon_and_http(BASE, provider) as (daemon, http):
            async with open_websocket_url(ws_url(daemon.port)) as ws:
                heard = Heard()
                for text, code in UNSPEAKABLE:
                    # json.dumps writes the surrogate as the escape a client would send.
                    await ws.send_message(json.dumps({"type": "send_message", "text": text}))
                    assert (await receive_until(ws, heard, of_type("error")))["code"] == code, ascii(text)
                    answer = await http.post("/v1/speak", content=json.dumps({"text": text}), headers=JSON)
                    assert answer.status_code == 400 and answer.json()["code"] == code, ascii(text)
                await send(ws, type="send_message", text="Still speaking.")
                assert (await receive_until(ws, heard, finished()))["status"] == "ok"
    assert provider.texts == ["Still speaking."]  # nothing unspeakable reached the voice


# ---------------------------------------------------------------- item 6: cross-site requests


async def test_a_page_on_another_origin_cannot_speak_through_http():
    provider = ScriptedProvider()
    for settings in (BASE, dataclasses.replace(BASE, allowed_origins=("http://good.example",))):
        with trio.fail_after(30):
            async with daemon_and_http(settings, provider) as (daemon, http):
                # The "simple" request a page can send without a preflight.
                simple = await http.post(
                    "/v1/speak", content='{"text":"Hi."}', headers={"Content-Type": "text/plain", "Origin": "http://evil.example"}
                )
                no_type = await http.post("/v1/speak", content='{"text":"Hi."}')
                form = await http.post("/v1/speak", data={"text": "Hi."})
                json_from_evil = await http.post("/v1/speak", json={"text": "Hi."}, headers={"Origin": "http://evil.example"})
                preflight = await http.options(
                    "/v1/speak",
                    headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
                )
        assert simple.status_code in (403, 415) and simple.json()["type"] == "error"
        assert no_type.status_code == 415 and no_type.json()["code"] == "invalid_command"
        assert form.status_code == 415
        assert json_from_evil.status_code == 403 and json_from_evil.json()["code"] == "unauthorized"
        assert preflight.status_code == 403
        for answer in (simple, json_from_evil, preflight):
            assert "access-control-allow-origin" not in answer.headers
    assert provider.texts == []


async def test_same_origin_and_listed_origins_may_speak_with_cors_for_the_listed_one():
    settings = dataclasses.replace(BASE, allowed_origins=("http://good.example",))
    provider = ScriptedProvider()
    with trio.fail_after(30):
        async with daemon_and_http(settings, provider) as (daemon, http):
            own = f"http://127.0.0.1:{daemon.http_port}"
            same = await http.post("/v1/speak", json={"text": "Same origin."}, headers={"Origin": own})
            preflight = await http.options(
                "/v1/speak",
                headers={
                    "Origin": "http://good.example",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type",
                },
            )
            listed = await http.post("/v1/speak", json={"text": "Listed."}, headers={"Origin": "http://good.example"})
            plain = await http.post("/v1/speak", json={"text": "No browser."}, headers={"Content-Type": "application/json; charset=utf-8"})
    assert same.status_code == 202 and "access-control-allow-origin" not in same.headers
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "http://good.example"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "content-type" in preflight.headers["access-control-allow-headers"].lower()
    assert listed.status_code == 202 and listed.headers["access-control-allow-origin"] == "http://good.example"
    assert plain.status_code == 202


async def test_the_page_and_its_files_carry_security_headers():
    with trio.fail_after(30):
        async with daemon_and_http() as (_, http):
            answers = [await http.get(path) for path in ("/", "/app.js", "/style.css", "/v1/info")]
    for answer in answers:
        assert answer.status_code == 200
        policy = answer.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy and "ws:" in policy
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["referrer-policy"] == "no-referrer"


# ---------------------------------------------------------------- item 7: protocol violations


def client_frame(first_byte: int, payload: bytes, *, masked: bool = True) -> bytes:
    """One hand-built client frame (payload under 126 bytes): FIN/RSV/opcode byte, then
    the mask bit and length, the masking key and the masked payload."""
    if not masked:
        return bytes([first_byte, len(payload)]) + payload
    key = b"\x11\x22\x33\x44"
    return bytes([first_byte, 0x80 | len(payload)]) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def close_code_after(port: int, bad_frame: bytes) -> int | None:
    """Open a WebSocket over a raw TCP stream, send `bad_frame`, read to the end of the
    stream; the code of the close frame the server sent (None: it sent none)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    ws = WSConnection(ConnectionType.CLIENT)
    code = None
    async with stream:
        await stream.send_all(ws.send(Request(host="127.0.0.1", target="/")))
        accepted = False
        while not accepted:
            data = await stream.receive_some(65536)
            assert data, "the handshake was not answered"
            ws.receive_data(data)
            accepted = any(isinstance(e, AcceptConnection) for e in ws.events())
        await stream.send_all(bad_frame)
        while data := await stream.receive_some(65536):
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, CloseConnection):
                    code = event.code
    return code


VIOLATIONS = [
    pytest.param(client_frame(0x81, b"\xff\xfe\xfd"), 1007, id="invalid-utf8-text"),
    pytest.param(client_frame(0x81, b"hi", masked=False), 1002, id="unmasked"),
    pytest.param(client_frame(0xC1, b"hi"), 1002, id="reserved-bit"),
    pytest.param(client_frame(0x83, b"hi"), 1002, id="reserved-opcode"),
]


@pytest.mark.parametrize("bad_frame, code", VIOLATIONS)
async def test_a_protocol_violation_gets_its_close_code_on_the_wire(bad_frame, code):
    with trio.fail_after(30), capture_logs() as logs:
        async with daemon_and_http() as (daemon, _):
            async with open_websocket_url(ws_url(daemon.port)) as other:
                await receive_until(other, Heard(), of_type("hello"))
                assert await close_code_after(daemon.port, bad_frame) == code
                await trio.testing.wait_all_tasks_blocked()
                # Everyone else carries on.
                await send(other, type="send_message", text="Carry on.")
                assert (await receive_until(other, Heard(), finished()))["status"] == "ok"
    reasons = [e["reason"] for e in logs if e["event"] == "subscriber.disconnected"]
    assert reasons[0].startswith(f"protocol violation: closed with {code}"), reasons


# ---------------------------------------------------------------- item 8: the smaller ones


async def test_voice_names_are_bounded_and_plain():
    provider = ScriptedProvider()
    with trio.fail_after(30):
        async with daemon_and_http(BASE, provider) as (daemon, http):
            async with open_websocket_url(ws_url(daemon.port)) as ws:
                heard = Heard()
                for voice in ("v" * 10_000, "../../etc/passwd", "af_heart\u0000", "C:\\voices\\x", "two words"):
                    await send(ws, type="send_message", text="Hi.", voice=voice)
                    assert (await receive_until(ws, heard, of_type("error")))["code"] == "invalid_command"
                    answer = await http.post("/v1/speak", json={"text": "Hi.", "voice": voice})
                    assert answer.status_code == 400 and answer.json()["code"] == "invalid_command"
                await send(ws, type="send_message", text="Mixed.", voice="af_bella(2)+af_sky(1)")
                started = await receive_until(ws, heard, of_type("utterance_started"))
    assert started["voice"] == "af_bella(2)+af_sky(1)"
    assert provider.texts == ["Mixed."]


async def test_get_on_speak_is_405_and_a_body_that_is_not_utf8_is_invalid_json():
    with trio.fail_after(30):
        async with daemon_and_http() as (_, http):
            got = await http.get("/v1/speak")
            put = await http.put("/v1/speak", json={"text": "Hi."})
            latin1 = await http.post("/v1/speak", content='{"text": "café"}'.encode("latin-1"), headers=JSON)
    assert got.status_code == 405 and "POST" in got.headers["allow"]
    assert put.status_code == 405
    assert latin1.status_code == 400 and latin1.json()["code"] == "invalid_json"
