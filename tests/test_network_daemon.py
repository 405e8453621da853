"""The whole daemon against real HTTP servers on loopback that behave like Kokoros and
OpenAI: from send_message to subscriber frames, switching and failing over."""

from __future__ import annotations

import dataclasses
import socket

import trio
from trio_websocket import open_websocket_url

from pipeline.config import Settings
from pipeline.daemon import running_daemon
from tests.fakes.tts_servers import FakeKokoros, FakeOpenAI, tone
from tests.support import Heard, finished, of_type, receive_until, send

KEY = "sk-test-fake-key-0123456789"


def closed_port() -> int:
    """A loopback port with nothing listening (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_for(kokoros_url: str, openai_url: str | None = None, **changes) -> Settings:
    base = dataclasses.replace(Settings(port=0, http_port=0), provider="kokoros")
    return dataclasses.replace(
        base,
        kokoros_url=kokoros_url,
        openai_url=openai_url or f"http://127.0.0.1:{closed_port()}",
        openai_api_key=KEY,
        short_first_piece=False,
        connect_timeout=2.0,
        first_byte_timeout=5.0,
        stall_timeout=5.0,
        **changes,
    )


async def test_pcm_split_at_odd_offsets_reaches_subscribers_bit_exact():
    pcm = tone(1500)
    fake = FakeKokoros(pcm=pcm, splits=[1, 3, 4801, 9999, 20001])
    with trio.fail_after(30):
        async with fake.running() as url, running_daemon(settings_for(url)) as daemon:
            async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/") as ws:
                heard = Heard()
                await send(ws, type="send_message", text="One sentence from Kokoros.")
                done = await receive_until(ws, heard, finished())
    assert done["status"] == "ok" and heard.of_type("utterance_started")[0]["provider"] == "kokoros"
    assert heard.pcm() == pcm
    request = fake.speech_requests[0].json
    assert request == {
        "model": "kokoro", "input": "One sentence from Kokoros.", "voice": "af_heart",
        "response_format": "pcm", "speed": 1.0, "stream": True,
    }


async def test_switching_while_speaking_finishes_on_the_old_provider_and_uses_the_new_one_next():
    kokoros = FakeKokoros(pcm=tone(500), stall_after=4800)
    openai = FakeOpenAI(api_key=KEY, pcm=tone(300))
    with trio.fail_after(30):
        async with kokoros.running() as k_url, openai.running() as o_url:
            async with running_daemon(settings_for(k_url, o_url)) as daemon:
                async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/") as ws:
                    heard = Heard()
                    await send(ws, type="send_message", text="Spoken by Kokoros.")
                    await kokoros.stalled.wait()  # the first utterance is mid-stream now
                    await send(ws, type="set_tts_provider", provider="openai")
                    await receive_until(ws, heard, of_type("provider_changed"))
                    await send(ws, type="send_message", text="Spoken by OpenAI.")
                    await receive_until(ws, heard, of_type("accepted"))
                    kokoros.release.set()
                    await receive_until(ws, heard, finished("u2"))
                    await send(ws, type="set_tts_provider", provider="piper")
                    await receive_until(ws, heard, of_type("provider_changed"))
                    await send(ws, type="send_message", text="Spoken by the embedded voice.")
                    await receive_until(ws, heard, finished("u3"))
    started = heard.of_type("utterance_started")
    assert [(e["utterance_id"], e["provider"]) for e in started] == [("u1", "kokoros"), ("u2", "openai"), ("u3", "piper")]
    assert [e["status"] for e in heard.of_type("utterance_finished")] == ["ok", "ok", "ok"]
    assert openai.speech_requests[0].headers["authorization"] == f"Bearer {KEY}"


async def test_kokoros_breaking_off_mid_utterance_fails_over_to_piper_and_ends_partial():
    # Every Kokoros answer breaks off halfway: the first piece is cut, the rest goes to piper.
    fake = FakeKokoros(pcm=tone(800), break_after=19200)
    text = "The first sentence is from Kokoros. The second sentence comes from the embedded voice. So does the third."
    with trio.fail_after(60):
        async with fake.running() as url, running_daemon(settings_for(url, fallback=("piper",))) as daemon:
            async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/") as ws:
                heard = Heard()
                await send(ws, type="send_message", text=text)
                done = await receive_until(ws, heard, finished())
    errors = heard.of_type("error")
    assert errors and errors[0]["code"] == "provider_failed" and errors[0]["recovered"] is True
    assert done["status"] == "partial" and done["chunks"] > 0
    first = [r for r in fake.speech_requests if r.json and r.json["input"] == "The first sentence is from Kokoros."]
    assert len(first) == 1  # the broken piece was not retried after its audio went out
    assert [f.is_final for f in heard.frames].count(True) == 1


async def test_a_dead_kokoros_server_falls_back_to_piper_with_every_word_spoken():
    url = f"http://127.0.0.1:{closed_port()}"
    with trio.fail_after(60):
        async with running_daemon(settings_for(url, fallback=("piper",))) as daemon:
            async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/") as ws:
                heard = Heard()
                await send(ws, type="send_message", text="Nobody is listening on that port. Piper speaks instead.")
                done = await receive_until(ws, heard, finished())
    assert done["status"] == "ok"
    assert heard.of_type("utterance_started")[0]["provider"] == "piper"
    assert heard.of_type("error")[0]["recovered"] is True


async def test_initialize_reports_an_unreachable_provider_and_switching_to_unconfigured_openai_is_refused():
    url = f"http://127.0.0.1:{closed_port()}"
    settings = dataclasses.replace(settings_for(url), openai_api_key=None)
    with trio.fail_after(30):
        async with running_daemon(settings) as daemon:
            async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/") as ws:
                heard = Heard()
                await send(ws, type="initialize")
                error = await receive_until(ws, heard, of_type("error"))
                assert error["code"] == "provider_unavailable" and url in error["message"]
                await send(ws, type="set_tts_provider", provider="openai")
                error = await receive_until(ws, heard, of_type("error"))
                assert error["code"] == "provider_unavailable" and "OPENAI_API_KEY" in error["message"]
                await send(ws, type="set_tts_provider", provider="piper")
                assert (await receive_until(ws, heard, of_type("provider_changed")))["provider"] == "piper"


async def test_cancel_aborts_the_request_in_flight():
    fake = FakeKokoros(pcm=tone(1000), stall_after=9600)
    with trio.fail_after(30):
        async with fake.running() as url, running_daemon(settings_for(url)) as daemon:
            async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/") as ws:
                heard = Heard()
                await send(ws, type="send_message", text="This will be cut short.")
                await fake.stalled.wait()
                await send(ws, type="cancel")
                done = await receive_until(ws, heard, finished())
                await fake.client_left.wait()  # the HTTP request was dropped, not left running
    assert done["status"] == "cancelled"
    assert fake.disconnects == 1


async def test_the_api_key_never_reaches_a_client():
    openai = FakeOpenAI(api_key="sk-a-different-key-than-ours-000")
    with trio.fail_after(30):
        async with openai.running() as o_url:
            settings = settings_for(f"http://127.0.0.1:{closed_port()}", o_url, provider="openai", fallback=())
            async with running_daemon(settings) as daemon:
                async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/") as ws:
                    heard = Heard()
                    await send(ws, type="send_message", text="Rejected key.")
                    done = await receive_until(ws, heard, finished())
    assert done["status"] == "failed"
    assert KEY not in repr(heard.events) and "sk-a-different" not in repr(heard.events)
    assert heard.of_type("error")[0]["code"] == "provider_failed"
