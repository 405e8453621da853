"""Streamed text (DESIGN.md section 10), as a client sees it over the WebSocket: a reply
spoken while it is still being written, in its FIFO place, ended by text_end, by its
connection closing, or by going quiet; refused appends change nothing.

A real daemon on loopback (port 0) with a scripted voice that records what it was asked
to say; `trio.fail_after` around every wait. The idle timers are tested on the router
with the MockClock.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess

import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from trio_websocket import open_websocket_url

from actors.router import Router
from pipeline.commands import TextAppend, TextStart
from pipeline.config import Settings
from pipeline.daemon import running_daemon
from pipeline.events import Status
from pipeline.flow import Envelope, UtteranceEnd
from pipeline.text import split_pieces
from tests.fakes.tts_servers import FakeKokoros
from tests.serve_process import SPEECHCAST
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

BASE = Settings(port=0, http_port=0, fallback=(), short_first_piece=False)
REPLY = "The storm passed in the night. By morning the village was quiet again. Everyone came out to look."


async def answer(ws, heard: Heard, **command) -> dict:
    await send(ws, **command)
    return await receive_until(ws, heard, lambda e: e["type"] in ("accepted", "error"))


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def test_a_stream_is_spoken_as_it_arrives_and_ends_ok_on_text_end():
    voice = ScriptedProvider()
    heard = Heard()
    with trio.fail_after(20):
        async with running_daemon(BASE, provider_set(BASE, voice)) as daemon, open_websocket_url(ws_url(daemon.port)) as ws:
            await receive_until(ws, heard, of_type("hello"))
            accepted = await answer(ws, heard, type="text_start", text="The storm passed ")
            utt = accepted["utterance_id"]
            for word in "in the night. By morning the village was quiet again. ".split(" "):
                await send(ws, type="text_append", utterance_id=utt, text=word + " ")
            await receive_until(ws, heard, of_type("utterance_started"))  # before text_end
            await send(ws, type="text_append", utterance_id=utt, text="Everyone came out")
            await send(ws, type="text_end", utterance_id=utt, text=" to look.")
            done = await receive_until(ws, heard, finished(utt))
    assert accepted["streaming"] is True and accepted["position"] == 0
    assert done["status"] == "ok" and done["chunks"] > 0
    assert " ".join(voice.texts).split() == REPLY.split()  # every word once, in order
    assert not heard.of_type("error")


async def test_appends_to_unknown_ended_or_another_connections_stream_are_refused():
    heard, other_heard = Heard(), Heard()
    with trio.fail_after(20):
        async with running_daemon(BASE, provider_set(BASE, HeldVoice())) as daemon:
            async with open_websocket_url(ws_url(daemon.port)) as ws, open_websocket_url(ws_url(daemon.port)) as other:
                await receive_until(ws, heard, of_type("hello"))
                await receive_until(other, other_heard, of_type("hello"))
                utt = (await answer(ws, heard, type="text_start"))["utterance_id"]
                foreign = await answer(other, other_heard, type="text_append", utterance_id=utt, text="Hijack. ")
                unknown = await answer(ws, heard, type="text_append", utterance_id="u999", text="Hello. ")
                await send(ws, type="text_end", utterance_id=utt, text="Mine alone.")
                ended = await answer(ws, heard, type="text_append", utterance_id=utt, text="Too late. ")
    assert [e["code"] for e in (foreign, unknown, ended)] == ["unknown_utterance"] * 3


async def test_a_stream_whose_connection_drops_ends_by_itself_and_the_queue_goes_on():
    voice = ScriptedProvider()
    heard = Heard()
    with trio.fail_after(20):
        async with running_daemon(BASE, provider_set(BASE, voice)) as daemon, open_websocket_url(ws_url(daemon.port)) as listener:
            await receive_until(listener, heard, of_type("hello"))
            async with open_websocket_url(ws_url(daemon.port, "?subscribe=0")) as writer:
                await receive_until(writer, Heard(), of_type("hello"))
                await send(writer, type="text_start", text="A whole sentence here. And half of")
                await receive_until(writer, Heard(), of_type("accepted"))
            # The writer is gone; a message queued behind its stream still gets spoken.
            await send(listener, type="send_message", text="Next in line, spoken after.")
            first = await receive_until(listener, heard, finished())
            second = await receive_until(listener, heard, finished())
    assert first["status"] == "partial"  # the reply was cut short mid-sentence
    assert second["status"] == "ok"
    assert " ".join(voice.texts).split() == "A whole sentence here. And half of Next in line, spoken after.".split()
    assert voice.texts[-1] == "Next in line, spoken after."


async def test_two_streams_and_a_whole_text_are_spoken_in_fifo_order():
    voice = ScriptedProvider()
    heard = Heard()
    with trio.fail_after(20):
        async with running_daemon(BASE, provider_set(BASE, voice)) as daemon:
            async with open_websocket_url(ws_url(daemon.port)) as one, open_websocket_url(ws_url(daemon.port, "?subscribe=0")) as two:
                await receive_until(one, heard, of_type("hello"))
                await receive_until(two, Heard(), of_type("hello"))
                first = (await answer(one, heard, type="text_start", text="First stream, "))["utterance_id"]
                second = (await answer(two, Heard(), type="text_start", text="Second stream. "))["utterance_id"]
                await send(one, type="send_message", text="A whole text waits behind them.")
                await send(two, type="text_end", utterance_id=second)
                await send(one, type="text_end", utterance_id=first, text="still the first.")
                ends = [await receive_until(one, heard, finished()) for _ in range(3)]
    assert [e["utterance_id"] for e in ends] == [first, second, "u3"]
    assert voice.texts == ["First stream, still the first.", "Second stream.", "A whole text waits behind them."]


async def test_cancel_during_a_stream_ends_it_and_later_appends_are_unknown():
    heard = Heard()
    with trio.fail_after(20):
        async with running_daemon(BASE, provider_set(BASE, HeldVoice())) as daemon, open_websocket_url(ws_url(daemon.port)) as ws:
            await receive_until(ws, heard, of_type("hello"))
            utt = (await answer(ws, heard, type="text_start", text="Speaking now. "))["utterance_id"]
            await receive_until(ws, heard, of_type("utterance_started"))
            await send(ws, type="cancel")
            done = await receive_until(ws, heard, finished(utt))
            late = await answer(ws, heard, type="text_append", utterance_id=utt, text="More. ")
    assert done["status"] == "cancelled"
    assert late["code"] == "unknown_utterance"


async def test_past_max_stream_chars_an_append_is_refused_whole_and_the_stream_ends_cleanly():
    voice = ScriptedProvider()
    settings = dataclasses.replace(BASE, max_stream_chars=100_000)
    heard = Heard()
    part = "word " * 800  # 4000 characters
    with trio.fail_after(60):
        async with running_daemon(settings, provider_set(settings, voice)) as daemon:
            async with open_websocket_url(ws_url(daemon.port, "?subscribe=0")) as ws:
                await receive_until(ws, heard, of_type("hello"))
                utt = (await answer(ws, heard, type="text_start"))["utterance_id"]
                for _ in range(25):  # exactly 100,000 characters
                    await send(ws, type="text_append", utterance_id=utt, text=part)
                refused = await answer(ws, heard, type="text_append", utterance_id=utt, text="x")
                await send(ws, type="text_end", utterance_id=utt, text="")
                done = await receive_until(ws, heard, finished(utt))
    assert refused["code"] == "text_too_long"
    assert done["status"] == "ok"
    assert sum(len(text.split()) for text in voice.texts) == 25 * 800


async def test_a_quiet_stream_speaks_its_tail_then_ends_by_itself(nursery, autojump_clock):
    voice = ScriptedProvider()
    settings = dataclasses.replace(BASE, stream_idle_flush_s=1.0, stream_idle_end_s=30.0)
    commands, commands_recv = trio.open_memory_channel(16)
    speech_send, speech = trio.open_memory_channel(1000)
    await nursery.start(Router(settings, provider_set(settings, voice), commands_recv, speech_send).run)
    started = trio.current_time()
    await commands.send(Envelope(1, TextStart(text="No full stop at the end"), started))
    with trio.fail_after(60):
        while not isinstance(end := await speech.receive(), UtteranceEnd):
            pass
    assert voice.texts == ["No full stop at the end"]  # spoken after the idle flush
    assert end.status is Status.OK  # nothing was held back when it ended
    assert trio.current_time() - started == pytest.approx(30.0)
    await commands.send(Envelope(1, TextAppend(end.utterance_id, "Too late."), trio.current_time()))
    with trio.fail_after(1):
        while True:
            item = await speech.receive()
            if hasattr(item, "event") and getattr(item.event, "code", None) == "unknown_utterance":
                break


LONG_REPLY = (
    "Dr. Smith said the fee is $29.99, e.g. for two people. The storm passed in the night, "
    "and by morning the village was quiet again, though the river ran high. Yes. Everyone came out to look."
)


@hyp_settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(1, len(LONG_REPLY) - 1), max_size=15, unique=True).map(sorted))
async def test_the_text_a_server_is_asked_to_speak_is_the_text_appended(cuts):
    """Whatever the appends (mid-word, mid-number, mid-abbreviation), the inputs a real
    HTTP server receives are the streamed text, no word split or glued."""
    parts = [LONG_REPLY[a:b] for a, b in zip([0, *cuts], [*cuts, len(LONG_REPLY)])]
    fake = FakeKokoros()
    with trio.fail_after(30):
        async with fake.running() as kokoros_url:
            settings = dataclasses.replace(BASE, provider="kokoros", kokoros_url=kokoros_url, short_first_piece=True)
            async with running_daemon(settings) as daemon, open_websocket_url(ws_url(daemon.port, "?subscribe=0")) as ws:
                heard = Heard()
                utt = (await answer(ws, heard, type="text_start"))["utterance_id"]
                for part in parts:
                    await send(ws, type="text_append", utterance_id=utt, text=part)
                await send(ws, type="text_end", utterance_id=utt)
                done = await receive_until(ws, heard, finished(utt))
    assert done["status"] == "ok"
    # Later pieces are requested side by side, so the server may see them in any order;
    # they are the whole text's pieces, whose concatenation is the text.
    pieces = [piece.strip() for piece in split_pieces(LONG_REPLY)]
    assert sorted(request.json["input"] for request in fake.speech_requests) == sorted(pieces)
    assert " ".join(pieces).split() == LONG_REPLY.split()


async def test_say_stream_speaks_standard_input_as_it_arrives():
    voice = ScriptedProvider()
    with trio.fail_after(30):
        async with running_daemon(BASE, provider_set(BASE, voice)) as daemon:
            process = await trio.lowlevel.open_process(
                [str(SPEECHCAST), "say", "--stream", "--url", ws_url(daemon.port)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            assert process.stdin is not None and process.stdout is not None
            words = "The first sentence is written. Then the second one comes, slowly. End".encode()
            for start in range(0, len(words), 7):  # split anywhere, even inside a word
                await process.stdin.send_all(words[start : start + 7])
            await process.stdin.send_all("é.".encode()[:1])  # split inside a character
            await process.stdin.send_all("é.".encode()[1:])
            await process.stdin.aclose()
            printed = b""
            while chunk := await process.stdout.receive_some():
                printed += chunk
            assert await process.wait() == 0
    assert " ".join(voice.texts).split() == "The first sentence is written. Then the second one comes, slowly. Endé.".split()
    assert b" ok: " in printed


async def test_a_text_plain_body_is_spoken_while_it_arrives():
    voice = ScriptedProvider()
    heard = Heard()
    reply = "The first sentence arrives early. The second comes later, word by word."
    sent_second = trio.Event()

    async def body():
        yield reply[:34].encode()
        # Not a byte more until the first piece has been heard: proof it is spoken while
        # the body is still arriving.
        await receive_until(ws, heard, of_type("utterance_started"))
        for word in reply[34:].split(" "):
            yield (word + " ").encode()
        sent_second.set()

    with trio.fail_after(30):
        async with running_daemon(BASE, provider_set(BASE, voice)) as daemon, open_websocket_url(ws_url(daemon.port)) as ws:
            await receive_until(ws, heard, of_type("hello"))
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.http_port}") as http:
                response = await http.post(
                    "/v1/speak?voice=scripted", content=body(), headers={"Content-Type": "text/plain; charset=utf-8"}
                )
            done = await receive_until(ws, heard, finished(response.json()["utterance_id"]))
    assert response.status_code == 202 and response.json()["streaming"] is True
    assert sent_second.is_set() and done["status"] == "ok"
    assert " ".join(voice.texts).split() == reply.split()


async def _read_until(stream: trio.SocketStream, received: bytearray, marker: bytes) -> None:
    while marker not in received:
        data = await stream.receive_some()
        assert data, f"the daemon closed before {marker!r}: {bytes(received)!r}"
        received += data


def _http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def test_a_text_plain_body_is_answered_once_accepted_before_it_ends():
    # A raw HTTP/1.1 client that reads the answer while it is still sending the body (as
    # `curl -T -` does): the 202 and the utterance id must come before the body ends.
    voice = ScriptedProvider()
    heard = Heard()
    with trio.fail_after(30):
        async with running_daemon(BASE, provider_set(BASE, voice)) as daemon, open_websocket_url(ws_url(daemon.port)) as ws:
            await receive_until(ws, heard, of_type("hello"))
            stream = await trio.open_tcp_stream("127.0.0.1", daemon.http_port)
            await stream.send_all(
                b"POST /v1/speak?voice=scripted HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n" + _http_chunk(b"The first sentence. ")
            )
            received = bytearray()
            await _read_until(stream, received, b'"streaming":true}\n')
            head, _, body = bytes(received).partition(b"\r\n\r\n")
            # Still mid-body: the rest of the text and the body's end are sent only now.
            await receive_until(ws, heard, of_type("utterance_started"))
            await stream.send_all(_http_chunk(b"And the last one.") + b"0\r\n\r\n")
            await _read_until(stream, received, b"\r\n0\r\n\r\n")
            done = await receive_until(ws, heard, finished())
            await stream.aclose()
    assert head.startswith(b"HTTP/1.1 202") and b"application/x-ndjson" in head.lower()
    assert done["status"] == "ok"
    assert " ".join(voice.texts).split() == "The first sentence. And the last one.".split()


async def test_a_text_plain_body_refused_midway_ends_with_an_error_line_and_its_speech_ends():
    settings = dataclasses.replace(BASE, max_stream_chars=40)
    voice = ScriptedProvider()
    heard = Heard()

    async def body():
        yield b"A short start. "
        yield b"x" * 60  # past max_stream_chars: refused whole

    with trio.fail_after(30):
        async with running_daemon(settings, provider_set(settings, voice)) as daemon, open_websocket_url(ws_url(daemon.port)) as ws:
            await receive_until(ws, heard, of_type("hello"))
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.http_port}") as http:
                response = await http.post("/v1/speak?voice=scripted", content=body(), headers={"Content-Type": "text/plain"})
            done = await receive_until(ws, heard, finished())
    accepted, refused = (json.loads(line) for line in response.text.splitlines())
    assert response.status_code == 202 and accepted["streaming"] is True
    assert refused["type"] == "error" and refused["code"] == "text_too_long"
    assert done["utterance_id"] == accepted["utterance_id"] and done["status"] == "ok"
    assert " ".join(voice.texts).split() == "A short start.".split()
