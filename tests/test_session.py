"""One owner for the session (issue 11): hello, /v1/info, /readyz and the answer to the
next command all say what the router published (docs/session.md), in each of the cases
where they used to disagree.

Real daemon in-process on loopback (port 0), a voice held mid-utterance for as long as
a test needs, `trio.fail_after` around every wait.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from pipeline.commands import TTSProvider
from pipeline.config import Settings
from pipeline.daemon import RunningDaemon, running_daemon
from pipeline.errors import ProviderUnavailable
from pipeline.session import SessionInput, SessionState, TRANSITIONS, transition
from tests.support import Heard, HeldVoice, ScriptedProvider, finished, of_type, provider_set, receive_until, send

BASE = Settings(port=0, http_port=0, fallback=())


class Unreachable(ScriptedProvider):
    """A provider whose health check fails, as a server that is not running does."""

    async def check(self) -> None:
        raise ProviderUnavailable(f"{self.name.value} is not reachable at http://127.0.0.1:9")


@dataclasses.dataclass
class Faces:
    """What a newcomer learns from every face of the daemon."""

    hello: str
    info: str
    ready: int
    reason: str | None


@asynccontextmanager
async def daemon(settings: Settings, *providers: ScriptedProvider) -> AsyncIterator[tuple[RunningDaemon, httpx.AsyncClient]]:
    async with running_daemon(settings, provider_set(settings, *providers)) as running:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.http_port}") as http:
            yield running, http


async def faces(running: RunningDaemon, http: httpx.AsyncClient) -> Faces:
    async with open_websocket_url(f"ws://127.0.0.1:{running.port}/?subscribe=0") as ws:
        hello = await receive_until(ws, Heard(), of_type("hello"))
    info = (await http.get("/v1/info")).json()
    ready = await http.get("/readyz")
    return Faces(hello["session"], info["session"], ready.status_code, ready.json().get("reason"))


async def answer(ws: WebSocketConnection, heard: Heard, **command: Any) -> dict[str, Any]:
    """Send a command and return the first answer-like event (accepted/error/ready/closed)."""
    await send(ws, **command)
    return await receive_until(ws, heard, lambda e: e["type"] in ("accepted", "error", "ready", "closed"))


async def test_initialize_while_a_close_drains_answers_closed_then_ready_and_stays_open():
    voice = HeldVoice()
    heard = Heard()
    with trio.fail_after(30):
        async with daemon(BASE, voice) as (running, http), open_websocket_url(f"ws://127.0.0.1:{running.port}/") as ws:
            await receive_until(ws, heard, of_type("hello"))
            await send(ws, type="send_message", text="Held in the middle for a while.")
            await receive_until(ws, heard, of_type("utterance_started"))
            await send(ws, type="close")
            await send(ws, type="initialize")
            await receive_until(ws, heard, of_type("ready"))
            voice.release.set()
            await receive_until(ws, heard, finished())
            after = await faces(running, http)
            accepted = await answer(ws, heard, type="send_message", text="Still open after all that.")
            await receive_until(ws, heard, finished())
    order = [kind for kind in heard.order if kind in ("closed", "ready")]
    assert order == ["closed", "ready"]  # the Close was answered first, and no late `closed`
    assert after == Faces("open", "open", 200, None)
    assert accepted["type"] == "accepted"


async def test_while_a_close_drains_every_face_says_closing():
    voice = HeldVoice()
    heard = Heard()
    with trio.fail_after(30):
        async with daemon(BASE, voice) as (running, http), open_websocket_url(f"ws://127.0.0.1:{running.port}/") as ws:
            await receive_until(ws, heard, of_type("hello"))
            await send(ws, type="send_message", text="Held in the middle for a while.")
            await receive_until(ws, heard, of_type("utterance_started"))
            await send(ws, type="close")
            refused = await answer(ws, heard, type="send_message", text="Too late for this one.")
            during = await faces(running, http)
            voice.release.set()
            await receive_until(ws, heard, of_type("closed"))
            after = await faces(running, http)
    assert refused["code"] == "not_initialized"
    assert during.hello == during.info == "closing" and during.ready == 503 and "closing" in (during.reason or "")
    assert after.hello == after.info == "closed" and after.ready == 503


async def test_a_failed_check_leaves_the_session_open_and_readyz_names_the_provider():
    kokoros = Unreachable(TTSProvider.KOKOROS)
    settings = dataclasses.replace(BASE, provider="kokoros")
    heard = Heard()
    with trio.fail_after(30):
        async with daemon(settings, kokoros) as (running, http), open_websocket_url(f"ws://127.0.0.1:{running.port}/") as ws:
            await receive_until(ws, heard, of_type("hello"))
            again = await answer(ws, heard, type="initialize")
            seen = await faces(running, http)
            accepted = await answer(ws, heard, type="send_message", text="Will anyone say this?")
    assert again["code"] == "provider_unavailable"
    assert seen.hello == seen.info == "open"
    assert seen.ready == 503 and seen.reason is not None and "not reachable" in seen.reason
    assert accepted["type"] == "accepted"


async def test_switching_to_an_unreachable_provider_makes_readyz_say_so():
    piper, kokoros = ScriptedProvider(), Unreachable(TTSProvider.KOKOROS)
    heard = Heard()
    with trio.fail_after(30):
        async with daemon(BASE, piper, kokoros) as (running, http), open_websocket_url(f"ws://127.0.0.1:{running.port}/") as ws:
            await receive_until(ws, heard, of_type("hello"))
            before = await faces(running, http)
            await send(ws, type="set_tts_provider", provider="kokoros")
            await receive_until(ws, heard, of_type("provider_changed"))
            after = await faces(running, http)
    assert before.ready == 200
    assert after.ready == 503 and after.reason is not None and "not reachable" in after.reason


def test_the_table_covers_every_state_and_input():
    assert set(TRANSITIONS) == {(state, event) for state in SessionState for event in SessionInput}
    assert transition(SessionState.CLOSING, SessionInput.INITIALIZE) is SessionState.OPEN
