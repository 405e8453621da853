"""The daemon end to end over real WebSockets on loopback: what clients see.

Loopback only, port 0, `trio.fail_after` around all I/O (real sockets, so no MockClock).
"""

from __future__ import annotations

import dataclasses

import pytest
import trio
from trio_websocket import open_websocket_url

from pipeline.audio import read_wav
from pipeline.config import Settings
from pipeline.daemon import running_daemon
from tests.support import (
    Heard,
    RecordingPiper,
    ScriptedProvider,
    finished,
    of_type,
    provider_set,
    receive_until,
    send,
    ws_url,
)

BASE = Settings(port=0, http_port=0)


def check_stream(heard: Heard, sample_rate: int) -> None:
    """What every subscriber of one spoken utterance must see."""
    started = heard.of_type("utterance_started")
    done = heard.of_type("utterance_finished")
    assert len(started) == 1 and len(done) == 1
    assert heard.order.index("utterance_started") < heard.order.index("chunk")
    assert heard.order[-1] == "utterance_finished"
    ids = [f.chunk_id for f in heard.frames]
    assert ids == list(range(started[0]["first_chunk_id"], started[0]["first_chunk_id"] + len(ids)))
    assert [f.is_final for f in heard.frames] == [False] * (len(ids) - 1) + [True]
    for frame in heard.frames:
        rate, pcm = read_wav(frame.audio)
        assert rate == sample_rate == started[0]["sample_rate"]
        assert pcm
    assert done[0]["status"] == "ok"
    assert done[0]["chunks"] == len(ids) and done[0]["last_chunk_id"] == ids[-1]


async def test_two_subscribers_hear_exactly_what_the_voice_produced():
    # At the voice's own rate no resampling happens, so the bytes must match exactly.
    settings = dataclasses.replace(BASE, sample_rate=22050)
    piper = RecordingPiper()
    with trio.fail_after(30):
        async with running_daemon(settings, provider_set(settings, piper)) as daemon:
            async with open_websocket_url(ws_url(daemon.port)) as one, open_websocket_url(ws_url(daemon.port)) as two:
                heard_one, heard_two = Heard(), Heard()
                await receive_until(one, heard_one, of_type("hello"))
                await receive_until(two, heard_two, of_type("hello"))
                await send(one, type="send_message", text="Hello there. This is the embedded voice speaking.")
                await receive_until(one, heard_one, finished())
                await receive_until(two, heard_two, finished())
    for heard in (heard_one, heard_two):
        heard.events = [e for e in heard.events if e["type"] not in ("hello", "accepted")]
        heard.order = [t for t in heard.order if t not in ("hello", "accepted")]
        check_stream(heard, 22050)
        assert heard.pcm() == bytes(piper.produced)
    assert heard_one.of_type("utterance_finished")[0]["ttfa_ms"] > 0


async def test_audio_leaves_at_the_configured_rate_whatever_the_voice_rate():
    piper = RecordingPiper()
    with trio.fail_after(30):
        async with running_daemon(BASE, provider_set(BASE, piper)) as daemon:
            async with open_websocket_url(ws_url(daemon.port)) as ws:
                heard = Heard()
                await send(ws, type="tts", text="Resampled to twenty four kilohertz.", stream=True)
                await receive_until(ws, heard, finished())
    heard.order = [t for t in heard.order if t not in ("hello", "accepted")]
    check_stream(heard, 24000)
    expected = len(piper.produced) * 24000 / 22050
    assert abs(len(heard.pcm()) - expected) <= 0.01 * expected


BAD_INPUT = [
    ("this is not json", "invalid_json"),
    ('["send_message"]', "invalid_command"),
    ('{"text": "no type"}', "invalid_command"),
    ('{"type": "dance"}', "invalid_command"),
    ('{"type": "send_message"}', "invalid_command"),
    ('{"type": "send_message", "text": 42}', "invalid_command"),
    ('{"type": "send_message", "text": "   "}', "empty_text"),
    ('{"type": "send_message", "text": "' + "a" * 4097 + '"}', "text_too_long"),
    ('{"type": "send_message", "text": "hi", "speed": 9}', "invalid_command"),
    ('{"type": "send_message", "text": "hi", "provider": "espeak"}', "unknown_provider"),
    ('{"type": "set_tts_provider", "provider": "espeak"}', "unknown_provider"),
]


async def test_bad_input_gets_its_error_and_the_connection_still_speaks():
    provider = ScriptedProvider()
    with trio.fail_after(30):
        async with running_daemon(BASE, provider_set(BASE, provider)) as daemon:
            async with open_websocket_url(ws_url(daemon.port)) as ws:
                heard = Heard()
                await receive_until(ws, heard, of_type("hello"))
                for raw, code in BAD_INPUT:
                    await ws.send_message(raw)
                    error = await receive_until(ws, heard, of_type("error"))
                    assert error["code"] == code, raw
                await ws.send_message(b"\x00\x01binary")
                assert (await receive_until(ws, heard, of_type("error")))["code"] == "binary_not_accepted"
                await send(ws, type="send_message", text="Still here.")
                accepted = await receive_until(ws, heard, of_type("accepted"))
                done = await receive_until(ws, heard, finished(accepted["utterance_id"]))
    assert done["status"] == "ok"
    assert provider.texts == ["Still here."]  # nothing bad reached the provider


async def test_close_finishes_the_queue_then_everyone_hears_closed():
    provider = ScriptedProvider()
    provider.gate = trio.Event()
    with trio.fail_after(30):
        async with running_daemon(BASE, provider_set(BASE, provider)) as daemon:
            async with open_websocket_url(ws_url(daemon.port)) as ws, open_websocket_url(ws_url(daemon.port)) as other:
                heard, heard_other = Heard(), Heard()
                for text in ("One is speaking.", "Two is waiting.", "Three is waiting."):
                    await send(ws, type="send_message", text=text)
                    await receive_until(ws, heard, of_type("accepted"))
                await send(ws, type="close")
                await send(ws, type="send_message", text="Too late.")
                assert (await receive_until(ws, heard, of_type("error")))["code"] == "not_initialized"
                provider.gate.set()
                await receive_until(ws, heard, of_type("closed"))
                await receive_until(other, heard_other, of_type("closed"))
                statuses = [e["status"] for e in heard.of_type("utterance_finished")]
                assert statuses == ["ok", "ok", "ok"]
                assert [e["type"] for e in heard_other.events if e["type"] in ("utterance_finished", "closed")] == [
                    "utterance_finished"
                ] * 3 + ["closed"]
                assert provider.closed >= 1  # the provider was released
                await send(ws, type="send_message", text="Still closed.")
                assert (await receive_until(ws, heard, of_type("error")))["code"] == "not_initialized"
                await send(ws, type="initialize")
                await receive_until(ws, heard, of_type("ready"))
                await send(ws, type="send_message", text="Open again.")
                accepted = await receive_until(ws, heard, of_type("accepted"))
                assert (await receive_until(ws, heard, finished(accepted["utterance_id"])))["status"] == "ok"


async def test_control_only_connection_gets_only_its_own_utterances():
    provider = ScriptedProvider()
    with trio.fail_after(30):
        async with running_daemon(BASE, provider_set(BASE, provider)) as daemon:
            async with open_websocket_url(ws_url(daemon.port, "?subscribe=0")) as control, open_websocket_url(
                ws_url(daemon.port, "?subscribe=0")
            ) as bystander, open_websocket_url(ws_url(daemon.port)) as listener:
                heard, heard_bystander, heard_listener = Heard(), Heard(), Heard()
                await receive_until(bystander, heard_bystander, of_type("hello"))
                await receive_until(listener, heard_listener, of_type("hello"))
                await send(control, type="send_message", text="Mine.")
                await receive_until(control, heard, finished())
                await receive_until(listener, heard_listener, finished())
                await send(bystander, type="set_tts_provider", provider="piper")
                await receive_until(bystander, heard_bystander, of_type("provider_changed"))
    assert heard.frames == []
    assert [e["type"] for e in heard.events] == ["hello", "accepted", "utterance_started", "utterance_finished"]
    # The bystander heard nothing of the other connection's utterance, only its own answer.
    assert [e["type"] for e in heard_bystander.events] == ["hello", "provider_changed"]
    assert len(heard_listener.frames) > 0


@pytest.mark.parametrize("query", ["?format=mp3", "?compress=yes", "?subscribe=2"])
async def test_bad_connection_options_are_refused_with_400(query):
    from trio_websocket import ConnectionRejected

    with trio.fail_after(30):
        async with running_daemon(BASE, provider_set(BASE, ScriptedProvider())) as daemon:
            with pytest.raises(ConnectionRejected) as refused:
                async with open_websocket_url(ws_url(daemon.port, query)):
                    pass
    assert refused.value.status_code == 400
