"""Graceful shutdown (DESIGN.md section 3): what clients and operators see when the
daemon stops.

In-process tests drive `serve(..., shutdown=event.wait)` with a voice that holds its
audio until the test releases it, so "in the middle of an utterance" is a fact, not a
race. Subprocess tests send real SIGTERMs to `speechcast serve` on the embedded voice.
Loopback, port 0, `trio.fail_after` around all I/O; the bounds are the only timing.
"""

from __future__ import annotations

import signal
from functools import partial

import pytest
import trio
from structlog.testing import capture_logs
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from actors.router import Router
from pipeline.commands import SendMessage
from pipeline.config import Settings
from pipeline.daemon import serve
from pipeline.events import ErrorEvent
from pipeline.flow import Audio, Envelope, Reply, Shutdown, UtteranceBegin, UtteranceEnd
from tests.serve_process import serve_process
from tests.support import (
    Heard,
    HeldVoice,
    ScriptedProvider,
    finished,
    of_type,
    provider_set,
    receive_until,
    send,
    ws_url,
)


async def until_closed(ws, heard: Heard) -> int:
    """Read everything up to the close; return the close code."""
    with pytest.raises(ConnectionClosed) as closed:
        await receive_until(ws, heard, lambda event: False)
    return closed.value.reason.code


def finals(heard: Heard) -> list[bool]:
    return [frame.is_final for frame in heard.frames]


# ---------------------------------------------------------------- in process


async def test_router_ends_queued_utterances_and_passes_shutdown_on_last():
    settings = Settings(shutdown_grace=30)
    voice = HeldVoice()
    commands_send, commands_recv = trio.open_memory_channel(16)
    speech_send, speech_recv = trio.open_memory_channel(256)
    seen = []

    async def read_until(done) -> None:
        async for item in speech_recv:
            seen.append(item)
            if done(item):
                return

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(Router(settings, provider_set(settings, voice), commands_recv, speech_send).run)
            await commands_send.send(Envelope(1, SendMessage("One."), 0.0))
            await commands_send.send(Envelope(1, SendMessage("Two."), 0.0))
            await read_until(lambda item: isinstance(item, Audio))
            await commands_send.send(Shutdown(30))
            await read_until(lambda item: isinstance(item, UtteranceEnd))
            await commands_send.send(Envelope(1, SendMessage("Three."), 0.0))
            await read_until(lambda item: isinstance(item, Reply) and isinstance(item.event, ErrorEvent))
            voice.release.set()
            await read_until(lambda item: isinstance(item, Shutdown))
            nursery.cancel_scope.cancel()

    ends = [item for item in seen if isinstance(item, UtteranceEnd)]
    assert [(end.utterance_id, end.status) for end in ends] == [("u2", "cancelled"), ("u1", "ok")]
    assert [item.utterance_id for item in seen if isinstance(item, UtteranceBegin)] == ["u1"]
    late = [item.event for item in seen if isinstance(item, Reply) and isinstance(item.event, ErrorEvent)]
    assert [(e.code, e.message) for e in late] == [("not_initialized", "the daemon is shutting down")]
    assert seen[-2] == ends[-1] and isinstance(seen[-1], Shutdown)
    assert voice.texts == ["One."]
    assert voice.closed == 1


async def test_shutdown_finishes_the_speaking_utterance_and_cancels_the_queued_one():
    settings = Settings(port=0, http_port=0, shutdown_grace=30)
    voice = HeldVoice()
    stop = trio.Event()
    heard, told = Heard(), Heard()
    with trio.fail_after(20), capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            daemon = await nursery.start(partial(serve, settings, provider_set(settings, voice), shutdown=stop.wait))
            async with open_websocket_url(ws_url(daemon.port)) as listener, open_websocket_url(
                ws_url(daemon.port, "?subscribe=0")
            ) as control:
                await receive_until(listener, heard, of_type("hello"))
                await send(control, type="send_message", text="One.")
                await send(control, type="send_message", text="Two.")
                await receive_until(control, told, lambda e: e.get("utterance_id") == "u2")
                await receive_until(listener, heard, of_type("utterance_started"))
                assert isinstance(await listener.get_message(), bytes)  # mid-way: audio is out

                stop.set()
                await receive_until(listener, heard, finished("u2"))  # the queue is ended first
                with pytest.raises(ConnectionRejected) as refused:
                    async with open_websocket_url(ws_url(daemon.port)):
                        pass
                await send(control, type="send_message", text="Three.")
                rejected = await receive_until(control, told, of_type("error"))

                voice.release.set()
                listener_code = await until_closed(listener, heard)
                control_code = await until_closed(control, told)

    assert refused.value.status_code == 503
    assert rejected["code"] == "not_initialized"
    assert (listener_code, control_code) == (1001, 1001)
    outcome = {e["utterance_id"]: e for e in heard.of_type("utterance_finished")}
    assert outcome["u2"]["status"] == "cancelled" and outcome["u2"]["chunks"] == 0
    assert outcome["u1"]["status"] == "ok"
    assert outcome["u1"]["chunks"] == len(heard.frames) + 1  # the first chunk was read above
    assert finals(heard)[-1] is True and finals(heard).count(True) == 1
    assert [e["status"] for e in told.of_type("utterance_finished")] == ["cancelled", "ok"]
    assert voice.texts == ["One."]
    events = [entry["event"] for entry in logs]
    assert events.index("daemon.stopping") < events.index("daemon.stopped")
    assert [e["graceful"] for e in logs if e["event"] == "daemon.stopped"] == [True]
    gone = [e["reason"] for e in logs if e["event"] == "subscriber.disconnected"]
    assert gone == ["daemon shutting down"] * 2


async def test_a_speaking_utterance_past_the_grace_is_cancelled():
    settings = Settings(port=0, http_port=0, shutdown_grace=0)
    voice = HeldVoice()  # never released: only the grace can end it
    stop = trio.Event()
    heard = Heard()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            daemon = await nursery.start(partial(serve, settings, provider_set(settings, voice), shutdown=stop.wait))
            async with open_websocket_url(ws_url(daemon.port)) as listener:
                await send(listener, type="send_message", text="One.")
                await receive_until(listener, heard, of_type("utterance_started"))
                stop.set()
                code = await until_closed(listener, heard)
    assert code == 1001
    [done] = heard.of_type("utterance_finished")
    assert done["status"] == "cancelled"
    assert True not in finals(heard)  # a cancelled utterance may end without isFinal


async def test_a_daemon_without_connections_stops_at_once():
    settings = Settings(port=0, http_port=0)
    stop = trio.Event()
    stop.set()  # asked to stop before it even started
    with trio.fail_after(10), capture_logs() as logs:
        await serve(settings, provider_set(settings, ScriptedProvider()), shutdown=stop.wait)
    assert [e["graceful"] for e in logs if e["event"] == "daemon.stopped"] == [True]


# ---------------------------------------------------------------- real signals

GRACE_S = 30
SENTENCES = (
    "The harbour was quiet in the early morning, and the fishing boats rocked gently at their moorings.",
    "A gull called twice from the top of the lighthouse, then glided low over the grey water.",
    "On the pier, an old man unfolded his chair, set down a flask of tea, and began to untangle his lines.",
    "Somewhere behind the warehouses a radio was playing, too faint to tell the tune.",
)


def long_text(words: int) -> str:
    """Natural sentences, repeated to about `words` words (at most 4096 characters)."""
    text, i = "", 0
    while len(text.split()) < words:
        text += SENTENCES[i % len(SENTENCES)] + " "
        i += 1
    return text.strip()[:4096]


async def test_sigterm_mid_utterance_delivers_the_rest_then_closes_with_1001_and_exits_0():
    heard = Heard()
    with trio.fail_after(60):
        async with serve_process("--shutdown-grace", str(GRACE_S)) as daemon, open_websocket_url(
            ws_url(daemon.port)
        ) as ws:
            await receive_until(ws, heard, of_type("hello"))
            await send(ws, type="send_message", text=long_text(150))
            await receive_until(ws, heard, of_type("utterance_started"))
            assert isinstance(await ws.get_message(), bytes)
            daemon.signal(signal.SIGTERM)
            with trio.fail_after(GRACE_S):
                code = await until_closed(ws, heard)
                exit_code = await daemon.exit_code()
    assert code == 1001
    assert exit_code == 0
    [done] = heard.of_type("utterance_finished")
    assert done["status"] == "ok"
    assert done["chunks"] == len(heard.frames) + 1  # the first chunk was read above
    assert finals(heard)[-1] is True and finals(heard).count(True) == 1
    assert [e["graceful"] for e in daemon.logged("daemon.stopped")] == [True]
    assert daemon.logged("daemon.signal")[0]["signal"] == "SIGTERM"


async def test_a_second_sigterm_stops_at_once():
    heard = Heard()
    with trio.fail_after(60):
        async with serve_process("--shutdown-grace", "600") as daemon, open_websocket_url(ws_url(daemon.port)) as ws:
            # About 4000 characters: minutes of audio, far more than the test waits for.
            await send(ws, type="send_message", text=long_text(800))
            await receive_until(ws, heard, of_type("utterance_started"))
            daemon.signal(signal.SIGTERM)
            await daemon.next_event("daemon.stopping")
            daemon.signal(signal.SIGTERM)
            with trio.fail_after(15):  # nowhere near the 600 s grace
                exit_code = await daemon.exit_code()
    assert exit_code == 0
    assert [e["action"] for e in daemon.logged("daemon.signal")] == ["stop gracefully", "stop now"]
    assert [e["graceful"] for e in daemon.logged("daemon.stopped")] == [False]
    assert heard.of_type("utterance_finished") == []
