"""Fuzzing everything a client can send (issue 10, "Keep it proven" (a)): WebSocket text
and binary messages, handshake query strings, and `/v1/speak` bodies, methods and
headers, against one in-process daemon with a scripted voice.

After every example: the message got exactly one answer (the one `parse_client_message`
predicts for input it refuses), nothing answered 5xx, and the daemon still answers (a
fresh connection gets `hello`, `/healthz` is 200).

Hypothesis drives the examples from a worker thread (`trio.to_thread`) and runs each one
on the test's own trio loop (`trio.from_thread.run`), so one daemon serves them all.
`make test` runs the `fuzz-brief` profile; `make fuzz` sets SPEECHCAST_FUZZ=long.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import ConnectionRejected, WebSocketConnection, open_websocket_url

from pipeline import client_input, protocol
from pipeline.config import Settings
from pipeline.daemon import RunningDaemon, running_daemon
from pipeline.errors import CommandError
from tests.conftest import FUZZ
from tests.support import Heard, ScriptedProvider, of_type, provider_set, receive_until

# No rate limit in the way: every message must get its own answer, not rate_limited.
SETTINGS = Settings(port=0, http_port=0, rate_limit=1e6, rate_burst=1_000_000)
# Events that answer one command of the sender's.
ANSWERS = frozenset({"error", "accepted", "cancelled", "ready", "provider_changed", "closed"})
EXAMPLE_TIMEOUT = 20
ANSWER_TIMEOUT = 10

# ---------------------------------------------------------------- what clients send

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
good_texts = st.text(min_size=1, max_size=60) | st.sampled_from(["Hello.", "日本語です。", "a\u200bb", "\u200b", "  "])
voices = st.sampled_from(["af_heart", "af_bella(2)+af_sky(1)", "en_US-joe-medium", "../x", "a" * 65, ""]) | st.text(max_size=70)
FIELDS = {
    "text": good_texts | json_values,
    "voice": voices | json_values,
    "speed": st.floats(0.25, 4.0) | json_values,
    "provider": st.sampled_from(protocol.PROVIDER_NAMES) | json_values,
    "all": st.booleans() | json_values,
    "stream": json_values,
    "utterance_id": st.sampled_from(["u1", "u2", ""]) | json_values,
    "flush": st.booleans() | json_values,
}
command_types = (
    st.sampled_from(
        ["send_message", "tts", "initialize", "set_tts_provider", "close", "cancel", "text_start", "text_append", "text_end"]
    )
    | json_values
)
commands = st.builds(lambda kind, rest: {"type": kind, **rest}, command_types, st.fixed_dictionaries({}, optional=FIELDS))
# Shapes that once hurt, or could: numbers past the int limit, deep nesting, escapes of
# lone surrogates and NUL, NaN, a BOM.
NASTY = [
    '{"type":"send_message","text":"hi","speed":' + "9" * 5000 + "}",
    '{"type":"initialize","n":-' + "1" * 4400 + "}",
    "[" * 20000,
    '{"type":"tts","text":"\\ud800"}',
    '{"type":"tts","text":"a\\u0000b"}',
    '{"type":"tts","text":"x","speed":NaN}',
    '{"type":"tts","text":"x","speed":1e999}',
    "\ufeff{}",
    '{"type":"tts","text":"' + "a" * 5000 + '"}',
]
text_messages = (
    commands.map(json.dumps)  # ensure_ascii: a lone surrogate travels as its escape
    | json_values.map(json.dumps)
    | st.text(max_size=200)
    | st.sampled_from(NASTY)
)
binary_messages = st.binary(max_size=300)

# Query strings: well-formed pairs, and raw percent-encoded bytes (invalid UTF-8 too).
query_keys = st.sampled_from(["format", "compress", "subscribe", "token", "timing", "x"]) | st.text(max_size=8)
query_values = st.sampled_from(["wav", "pcm", "opus", "words", "visemes", "all", "0", "1", "2", ""]) | st.text(max_size=12)
queries = st.lists(st.tuples(query_keys, query_values), max_size=5).map(urllib.parse.urlencode) | st.binary(
    max_size=30
).map(lambda raw: urllib.parse.quote_from_bytes(raw, safe="=&"))

# /v1/speak
methods = st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE", "OPTIONS", "PATCH", "HEAD"])
# Header values as an HTTP client can send them (h11 refuses surrounding whitespace).
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).map(str.strip)
content_types = st.sampled_from(
    ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "text/plain", "", "application/x-www-form-urlencoded"]
) | header_values
origins = st.none() | st.sampled_from(["http://evil.example", "null", "http://127.0.0.1"]) | header_values
authorizations = st.none() | st.sampled_from(["Bearer x", "Bearer", "Basic abc", ""])
bodies = commands.map(lambda c: json.dumps(c).encode()) | st.binary(max_size=300) | st.sampled_from(NASTY).map(str.encode)


# ---------------------------------------------------------------- the harness


@asynccontextmanager
async def fuzzed_daemon() -> AsyncIterator[tuple[RunningDaemon, httpx.AsyncClient]]:
    async with running_daemon(SETTINGS, provider_set(SETTINGS, ScriptedProvider())) as daemon:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.http_port}") as http:
            yield daemon, http


async def run_examples(test: Callable[..., Awaitable[None]], *strategies: st.SearchStrategy[Any]) -> None:
    """Let hypothesis drive `test(daemon, http, *drawn)` from a worker thread, each
    example on this trio loop, against one daemon."""
    async with fuzzed_daemon() as (daemon, http):

        @FUZZ
        @given(st.tuples(*strategies))
        def example(drawn: tuple[Any, ...]) -> None:
            trio.from_thread.run(one_example, test, daemon, http, drawn)

        await trio.to_thread.run_sync(example)


async def one_example(test: Callable[..., Awaitable[None]], daemon: RunningDaemon, http: httpx.AsyncClient, drawn: tuple) -> None:
    with trio.fail_after(EXAMPLE_TIMEOUT):
        await test(daemon, http, *drawn)
        await still_serving(daemon, http)


async def still_serving(daemon: RunningDaemon, http: httpx.AsyncClient) -> None:
    async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/?subscribe=0") as ws:
        await receive_until(ws, Heard(), of_type("hello"))
    assert (await http.get("/healthz")).status_code == 200


def is_answer(event: dict[str, Any]) -> bool:
    """An event answering a command (an error about an utterance's speech is not one)."""
    return event["type"] in ANSWERS and not (event["type"] == "error" and "utterance_id" in event)


async def answers_until_sentinel(ws: WebSocketConnection) -> list[dict[str, Any]]:
    """Send `cancel` (always answered by `cancelled`, to the sender) and return the two
    answers, the message's and the sentinel's. They may come in either order: an
    `initialize` is answered when its provider check ends (docs/session.md)."""
    await ws.send_message('{"type":"cancel"}')
    heard = Heard()
    answers: list[dict[str, Any]] = []
    with trio.move_on_after(ANSWER_TIMEOUT):
        while True:
            event = await receive_until(ws, heard, is_answer)
            answers.append(event)
            if len(answers) >= 2 and any(answer["type"] == "cancelled" for answer in answers):
                return answers
    raise AssertionError(f"no answer to the sentinel within {ANSWER_TIMEOUT} s; heard {heard.events}")


def expected_code(message: str) -> str | None:
    """The error code the protocol gives this message, None when it is a command."""
    try:
        client_input.parse_client_message(message)
    except CommandError as e:
        return e.code
    return None


# ---------------------------------------------------------------- the fuzz tests


async def test_fuzz_websocket_messages():
    async def one(daemon: RunningDaemon, http: httpx.AsyncClient, message: str | bytes) -> None:
        async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/?subscribe=0") as ws:
            await receive_until(ws, Heard(), of_type("hello"))
            await ws.send_message(message)
            answers = await answers_until_sentinel(ws)
        assert len(answers) == 2, answers  # one for the message, one for the sentinel
        # The sentinel's `cancelled` is the later one when both are `cancelled`.
        answer = answers[0] if answers[1]["type"] == "cancelled" else answers[1]
        if isinstance(message, bytes):
            assert answer["code"] == "binary_not_accepted"
        elif (code := expected_code(message)) is not None:
            assert answer["type"] == "error" and answer["code"] == code, (message[:200], answer)
        else:
            assert answer["type"] != "error" or answer["code"] not in ("invalid_json", "invalid_command"), answer

    await run_examples(one, text_messages | binary_messages)


async def test_fuzz_handshake_query_strings():
    async def one(daemon: RunningDaemon, http: httpx.AsyncClient, query: str) -> None:
        try:
            async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/?{query}") as ws:
                await receive_until(ws, Heard(), of_type("hello"))
        except ConnectionRejected as refused:
            assert 400 <= refused.status_code < 500, (query, refused.status_code)

    await run_examples(one, queries)


async def test_fuzz_http_speak_requests():
    async def one(
        daemon: RunningDaemon,
        http: httpx.AsyncClient,
        method: str,
        content_type: str,
        origin: str | None,
        authorization: str | None,
        body: bytes,
    ) -> None:
        headers = {"Content-Type": content_type}
        if origin is not None:
            headers["Origin"] = origin
        if authorization is not None:
            headers["Authorization"] = authorization
        answer = await http.request(method, "/v1/speak", content=body, headers=headers)
        assert answer.status_code < 500, (method, headers, body[:200], answer.text)
        if answer.status_code >= 400 and method != "HEAD":
            assert answer.json()["type"] == "error", answer.text
        if answer.status_code == 202:
            assert "utterance_id" in answer.json()

    await run_examples(one, methods, content_types, origins, authorizations, bodies)
