"""What the daemon does when a provider or the operating system misbehaves (issue 10):
a stalled provider check never freezes the command loop or start-up, a text one voice
cannot speak never opens its circuit for everyone, an open circuit shows on /readyz, and
SIGHUP/SIGUSR1 never kill the daemon.

Loopback, port 0, `trio.fail_after` around I/O; the router test runs on the MockClock.
"""

from __future__ import annotations

import dataclasses
import signal

import httpx
import pytest
import trio
import trio.testing
from trio_websocket import open_websocket_url

from actors.router import Router
from pipeline.commands import Cancel, Initialize, TTSProvider
from pipeline.config import Settings
from pipeline.daemon import running_daemon
from pipeline.errors import ProviderFailed, UnspeakableText
from pipeline.events import Cancelled, ErrorCode
from pipeline.flow import Envelope, Reply
from tests.serve_process import serve_process
from tests.support import (
    Heard,
    ScriptedProvider,
    finished,
    of_type,
    provider_set,
    receive_until,
    send,
    tone,
)

BASE = Settings(port=0, http_port=0, fallback=())


class StalledCheck(ScriptedProvider):
    """A provider whose health check never answers (a server that accepts and hangs)."""

    async def check(self) -> None:
        await trio.sleep_forever()


async def until_open(ws, heard: Heard) -> None:
    hello = await receive_until(ws, heard, of_type("hello"))
    if hello["session"] != "open":
        await receive_until(ws, heard, of_type("ready"))


async def next_reply(speech: trio.MemoryReceiveChannel) -> Reply:
    """The next answer to a connection (skipping the router's published SessionStatus)."""
    while not isinstance(item := await speech.receive(), Reply):
        pass
    return item


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def test_a_stalled_provider_check_neither_delays_start_up_nor_cancel(nursery, autojump_clock):
    commands, commands_recv = trio.open_memory_channel(16)
    speech_send, speech = trio.open_memory_channel(256)
    router = Router(BASE, provider_set(BASE, StalledCheck()), commands_recv, speech_send)
    with trio.fail_after(1):  # the router is up at once, though the check hangs
        await nursery.start(router.run)
    await commands.send(Envelope(1, Initialize(), trio.current_time()))
    asked_at = trio.current_time()
    await commands.send(Envelope(2, Cancel(), asked_at))
    cancelled = await next_reply(speech)
    assert trio.current_time() - asked_at < 0.1
    assert cancelled == Reply(2, Cancelled(()))
    with trio.fail_after(router.check_timeout + 1):
        answer = await next_reply(speech)
    assert answer.to == 1 and answer.event.code is ErrorCode.PROVIDER_UNAVAILABLE
    assert f"within {router.check_timeout:g} s" in answer.event.message


async def test_the_daemon_listens_while_its_provider_is_checked_and_readyz_says_so():
    settings = dataclasses.replace(BASE, connect_timeout=30)
    with trio.fail_after(10):
        async with running_daemon(settings, provider_set(settings, StalledCheck())) as daemon:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.http_port}") as http:
                ready = await http.get("/readyz")
            async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/") as ws:
                heard = Heard()
                await receive_until(ws, heard, of_type("hello"))
                await send(ws, type="cancel")
                await receive_until(ws, heard, of_type("cancelled"))
    assert ready.status_code == 503 and ready.json()["reason"] == "piper is being checked"


def refuses_bad_texts(text: str) -> list[bytes | ProviderFailed]:
    if "unspeakable" in text:
        return [UnspeakableText("the embedded voice crashed on this text")]
    return [tone(2400)]


async def test_texts_a_voice_cannot_speak_fail_alone_and_never_open_its_circuit():
    provider = ScriptedProvider(script=refuses_bad_texts)
    settings = dataclasses.replace(BASE, breaker_failures=2)
    heard = Heard()
    with trio.fail_after(20):
        async with running_daemon(settings, provider_set(settings, provider)) as daemon:
            async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/") as ws:
                await until_open(ws, heard)
                for _ in range(4):
                    await send(ws, type="send_message", text="This one is unspeakable, sadly.")
                    await receive_until(ws, heard, finished())
                await send(ws, type="send_message", text="This one is fine, thank you.")
                done = await receive_until(ws, heard, finished())
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.http_port}") as http:
                    ready = await http.get("/readyz")
    statuses = [e["status"] for e in heard.of_type("utterance_finished")]
    assert statuses == ["failed"] * 4 + ["ok"] and done["chunks"] > 0
    errors = heard.of_type("error")
    assert len(errors) == 4 and all("crashed on this text" in e["message"] for e in errors)
    assert ready.status_code == 200


async def test_readyz_reports_an_open_circuit():
    provider = ScriptedProvider(script=lambda text: [ProviderFailed("the voice is unwell")])
    settings = dataclasses.replace(BASE, breaker_failures=2, breaker_cooldown=600)
    heard = Heard()
    with trio.fail_after(20):
        async with running_daemon(settings, provider_set(settings, provider)) as daemon:
            async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/") as ws:
                await until_open(ws, heard)
                for _ in range(2):
                    await send(ws, type="send_message", text="Say something, anything at all.")
                    await receive_until(ws, heard, finished())
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.http_port}") as http:
                ready = await http.get("/readyz")
    assert ready.status_code == 503
    assert "failed 2 times in a row" in ready.json()["reason"] and "breaker_cooldown" in ready.json()["reason"]


async def test_sighup_and_sigusr1_mid_utterance_change_nothing():
    heard = Heard()
    with trio.fail_after(60):
        async with serve_process() as daemon, open_websocket_url(f"ws://127.0.0.1:{daemon.port}/") as ws:
            await receive_until(ws, heard, of_type("hello"))
            await send(ws, type="send_message", text="The lighthouse keeper climbed the stairs. " * 4)
            await receive_until(ws, heard, of_type("utterance_started"))
            daemon.signal(signal.SIGHUP)
            daemon.signal(signal.SIGUSR1)
            done = await receive_until(ws, heard, finished())
            await send(ws, type="send_message", text="Still here, and still speaking.")
            again = await receive_until(ws, heard, finished())
            daemon.signal(signal.SIGTERM)
            exit_code = await daemon.exit_code()
    assert done["status"] == "ok" and again["status"] == "ok"
    assert exit_code == 0
    ignored = [(e["signal"], e["action"]) for e in daemon.logged("daemon.signal")]
    assert ignored[:2] == [("SIGHUP", "ignored"), ("SIGUSR1", "ignored")]


class VoiceRecorder(ScriptedProvider):
    """A scripted provider that knows its voices and remembers the voice of each piece."""

    known_voices = frozenset({"scripted", "other"})

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.voices: list[str | None] = []

    async def synthesize(self, text, voice, speed):
        self.voices.append(voice)
        async for pcm in super().synthesize(text, voice, speed):
            yield pcm


async def test_a_voice_is_checked_against_the_provider_and_a_fallback_speaks_with_its_own():
    piper = VoiceRecorder(TTSProvider.PIPER)
    kokoros = ScriptedProvider(TTSProvider.KOKOROS, script=lambda text: [ProviderFailed("the server is down")])
    settings = dataclasses.replace(BASE, fallback=("piper",))
    heard = Heard()
    with trio.fail_after(20):
        async with running_daemon(settings, provider_set(settings, piper, kokoros)) as daemon:
            async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/") as ws:
                await until_open(ws, heard)
                await send(ws, type="send_message", text="Not a voice of this one.", voice="af_heart")
                refused = await receive_until(ws, heard, of_type("error"))
                await send(ws, type="send_message", text="Spoken in the other voice.", voice="other")
                await receive_until(ws, heard, finished())
                await send(ws, type="send_message", text="Kokoros fails, piper speaks.", voice="af_heart", provider="kokoros")
                await receive_until(ws, heard, finished())
    assert refused["code"] == "invalid_command" and "piper has no voice 'af_heart'" in refused["message"]
    first, second = heard.of_type("utterance_started")
    assert (first["provider"], first["voice"]) == ("piper", "other")
    # The client's voice was a Kokoros voice: the fallback speaks with its own default.
    assert (second["provider"], second["voice"]) == ("piper", "scripted")
    assert piper.voices == ["other", None]
