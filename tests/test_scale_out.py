"""Several daemons, one audience (issue 15, DESIGN.md section 13): a real Redis server on
a free loopback port and three `speechcast serve --broker ...` subprocesses (a daemon may
be killed, so none runs in the test process), speaking through a fake Kokoros on loopback.

What a user would observe: every listener hears the same bytes whatever daemon it is on
and whatever daemon got the text; answers reach their sender only; the speaker's death,
an edge's death and the broker's absence end nothing silently, and all recover.
`trio.fail_after` bounds every wait; waits are on log events or answers, never sleeps.
"""

from __future__ import annotations

import datetime
import json
import signal
import subprocess
import sys
import time
import wave
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from pipeline import protocol
from tests.broker_group import (
    SPEECHCAST,
    Daemon,
    daemon_group,
    next_speaker,
    redis_server,
    took_over,
)
from tests.fakes.tts_servers import FakeKokoros, FakeOpenAI, tone
from tests.test_walkthrough import LineReader

LEASE_S = 3.0  # the default speaker_lease_s
WORTH_SHOWING = {"speaker", "broker", "utterance", "command", "(not json)"}
OPENAI_KEY = "sk-test-fake-key-0123456789"


@dataclass
class Listener:
    """One WebSocket client: every message as it arrived (frames as raw bytes)."""

    ws: WebSocketConnection
    messages: list[str | bytes] = field(default_factory=list)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        parsed = [json.loads(m) for m in self.messages if isinstance(m, str)]
        return [e for e in parsed if kind is None or e["type"] == kind]

    def frames(self) -> list[bytes]:
        return [m for m in self.messages if isinstance(m, bytes)]

    async def until(self, kind: str, count: int = 1, **fields: Any) -> dict[str, Any]:
        """Read until the `count`-th event of `kind` with these fields; that event."""
        while True:
            matching = [e for e in self.events(kind) if all(e.get(k) == v for k, v in fields.items())]
            if len(matching) >= count:
                return matching[count - 1]
            self.messages.append(await self.ws.get_message())

    async def until_frames(self, count: int) -> None:
        while len(self.frames()) < count:
            self.messages.append(await self.ws.get_message())

    async def send(self, **message: Any) -> None:
        await self.ws.send_message(json.dumps(message))


@asynccontextmanager
async def listening(daemon: Daemon, query: str = "") -> AsyncIterator[Listener]:
    async with open_websocket_url(daemon.ws(query)) as ws:
        listener = Listener(ws)
        await listener.until("hello")
        yield listener


def chunk_ids(frames: list[bytes]) -> list[int]:
    return [protocol.decode_voice_frame(zlib.decompress(f) if protocol.is_compressed(f) else f).chunk_id for f in frames]


@asynccontextmanager
async def group(*extra: str, pcm: bytes | None = None, env: dict[str, str] | None = None) -> AsyncIterator[tuple[list[Daemon], FakeKokoros, Any]]:
    """Redis, a fake Kokoros and three daemons speaking through it; waits for a speaker."""
    fake = FakeKokoros(pcm=pcm or tone(1000))
    async with fake.running() as url, redis_server() as redis:
        args = ("--provider", "kokoros", "--kokoros-url", url, "--fallback", "", *extra)
        async with daemon_group(redis.url, 3, *args, env=env) as daemons:
            try:
                await next_speaker(daemons, 0)
                yield daemons, fake, redis
            except BaseException:
                for i, daemon in enumerate(daemons):  # (pytest shows this with the failure)
                    for event in daemon.events:
                        if event.get("level") in ("warning", "error") or event["event"].split(".")[0] in WORTH_SHOWING:
                            print(i, event)
                raise


async def roles(daemons: list[Daemon]) -> tuple[Daemon, list[Daemon]]:
    """(the speaker, the others), as /v1/info says."""
    infos = [await d.info() for d in daemons]
    speakers = [d for d, info in zip(daemons, infos) if info["role"] == "speaker"]
    assert len(speakers) == 1, infos
    return speakers[0], [d for d, info in zip(daemons, infos) if info["role"] == "edge"]


def logged_at(event: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


# ---------------------------------------------------------------- without a broker


def test_without_a_broker_the_redis_client_is_never_imported():
    script = (
        "import sys, trio\n"
        "from pipeline.config import Settings\n"
        "from pipeline.daemon import running_daemon\n"
        "async def main():\n"
        "    async with running_daemon(Settings(port=0, http_port=0, provider='kokoros', fallback=())):\n"
        "        pass\n"
        "trio.run(main)\n"
        "print('redis' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False"


# ---------------------------------------------------------------- one audience


async def test_every_listener_hears_the_same_bytes_whichever_daemon_got_the_text():
    with trio.fail_after(60):
        async with group() as (daemons, fake, _):
            d0, d1, d2 = daemons
            async with (
                listening(d0) as wav0,
                listening(d1) as wav1,
                listening(d2) as wav2,
                listening(d0, "?format=pcm&compress=1") as packed0,
                listening(d2, "?format=pcm&compress=1") as packed2,
                listening(d0, "?format=opus&timing=all") as opus0,
                listening(d1, "?format=opus&timing=all") as opus1,
                listening(d1, "?subscribe=0") as sender1,
            ):
                await wav0.send(type="send_message", text="From the first daemon.")
                first = await wav0.until("accepted")
                await wav0.until("utterance_finished", utterance_id=first["utterance_id"])
                await sender1.send(type="send_message", text="From the second daemon.")
                second = await sender1.until("accepted")
                await sender1.until("utterance_finished", utterance_id=second["utterance_id"])
                async with httpx.AsyncClient() as http:
                    spoken = await http.post(d2.http + "/v1/speak", json={"text": "From the third daemon."})
                assert spoken.status_code == 202
                third = spoken.json()["utterance_id"]
                everyone = (wav0, wav1, wav2, packed0, packed2, opus0, opus1)
                for listener in everyone:
                    await listener.until("utterance_finished", utterance_id=third)
    ids = [first["utterance_id"], second["utterance_id"], third]
    assert len(set(ids)) == 3
    assert len(fake.speech_requests) == 3  # each spoken once, by the speaker alone
    # Byte for byte the same frames, with the same chunk ids, on every daemon.
    assert wav0.frames() == wav1.frames() == wav2.frames()
    assert packed0.frames() == packed2.frames()
    frames = wav0.frames()
    assert len(frames) >= 3 * 2
    assert chunk_ids(frames) == list(range(chunk_ids(frames)[0], chunk_ids(frames)[0] + len(frames)))
    assert chunk_ids(packed0.frames()) == chunk_ids(frames)
    # Opus too: one encoder per utterance, at the speaker, so the same packets everywhere;
    # and the word timings cross the broker with the frames.
    assert opus0.frames() == opus1.frames() and chunk_ids(opus0.frames()) == chunk_ids(frames)
    assert opus0.events("words") == opus1.events("words")
    spoken_words = [w["word"] for e in opus0.events("words") for w in e["words"]]
    assert spoken_words == "From the first daemon From the second daemon From the third daemon".split()
    for listener in everyone:
        finished = listener.events("utterance_finished")
        assert [e["utterance_id"] for e in finished] == ids
        assert all(e["status"] == "ok" for e in finished)
    # Replies reach the sender only: wav0 was answered, the other listeners were not.
    assert [e["utterance_id"] for e in wav0.events("accepted")] == [first["utterance_id"]]
    assert [e["utterance_id"] for e in sender1.events("accepted")] == [second["utterance_id"]]
    for listener in (wav1, wav2, packed0, packed2, opus0, opus1):
        assert listener.events("accepted") == []
    # A control-only sender hears the events of its own utterance, not the others'.
    assert [e["utterance_id"] for e in sender1.events("utterance_finished")] == [second["utterance_id"]]
    assert sender1.frames() == []


async def test_set_tts_provider_on_one_daemon_changes_the_next_utterance_everywhere():
    openai = FakeOpenAI(api_key=OPENAI_KEY, pcm=tone(300))
    with trio.fail_after(60):
        async with openai.running() as openai_url:
            env = {"OPENAI_API_KEY": OPENAI_KEY}
            async with group("--openai-url", openai_url, env=env) as (daemons, fake, _):
                d0, d1, d2 = daemons
                async with listening(d0) as listener0, listening(d1) as switcher, listening(d2) as sender:
                    await switcher.send(type="set_tts_provider", provider="openai")
                    await switcher.until("provider_changed")
                    await listener0.until("provider_changed")
                    await sender.until("provider_changed")
                    await sender.send(type="send_message", text="Spoken by the new provider.")
                    started = await listener0.until("utterance_started")
                    await listener0.until("utterance_finished")
                    infos = [await d.info() for d in daemons]
                    async with httpx.AsyncClient() as http:
                        metrics = [(await http.get(d.http + "/metrics")).text for d in daemons]
    assert started["provider"] == "openai"
    assert len(openai.speech_requests) == 1 and fake.speech_requests == []
    assert {info["provider"] for info in infos} == {"openai"}
    # One speaker, as /v1/info and the metric say alike.
    roles_seen = [info["role"] for info in infos]
    assert sorted(roles_seen) == ["edge", "edge", "speaker"]
    for role, text in zip(roles_seen, metrics):
        assert f"speechcast_speaker {1.0 if role == 'speaker' else 0.0}" in text


# ---------------------------------------------------------------- failures


async def test_when_the_speaker_is_killed_midway_another_takes_over_and_nothing_hangs():
    with trio.fail_after(90):
        async with group() as (daemons, fake, _):
            speaker, (edge1, edge2) = await roles(daemons)
            terms = took_over(daemons)
            fake.stall_after = 9600  # 200 ms of audio, then the speech holds
            async with listening(edge1) as sender, listening(edge2) as listener:
                await sender.send(type="send_message", text="Cut off in the middle.")
                speaking = (await sender.until("accepted"))["utterance_id"]
                await sender.send(type="send_message", text="Waiting in the queue.")
                queued = (await sender.until("accepted", 2))["utterance_id"]
                await listener.until("utterance_started", utterance_id=speaking)
                await fake.stalled.wait()
                await listener.until_frames(2)  # (40 and 80 ms; the rest is held for more audio)
                heard_before = len(listener.frames())
                killed_at = time.time()
                speaker.kill()
                fake.stall_after = None  # (the next speaker's requests are answered whole)
                # Sent while no daemon speaks: it waits in the broker for the next speaker.
                await sender.send(type="send_message", text="Sent while nobody speaks.")
                successor = await next_speaker(daemons, terms)
                elected = successor.logged("speaker.elected")[-1]
                cut = await listener.until("utterance_finished", utterance_id=speaking)
                requeued = await listener.until("utterance_finished", utterance_id=queued)
                await sender.until("utterance_finished", utterance_id=queued)
                waited = (await sender.until("accepted", 3))["utterance_id"]
                meanwhile = await listener.until("utterance_finished", utterance_id=waited)
                await sender.send(type="send_message", text="Spoken after the takeover.")
                after = (await sender.until("accepted", 4))["utterance_id"]
                spoken = await listener.until("utterance_finished", utterance_id=after)
                info = await successor.info()
            took = logged_at(elected) - killed_at
            print(f"speaker killed: {successor.http} speaker after {took:.2f} s (bound {LEASE_S + 1} s)")
            assert took <= LEASE_S + 1
            assert info["role"] == "speaker"
            assert cut["status"] == "partial" and cut["chunks"] == heard_before
            # The queued text, none of it heard, was spoken whole by the next speaker.
            assert requeued["status"] == "ok" and requeued["chunks"] > 0, (requeued, listener.events("error"))
            assert meanwhile["status"] == "ok" and spoken["status"] == "ok" and spoken["chunks"] > 0
            assert len({speaking, queued, waited, after}) == 4
            ids = chunk_ids(listener.frames())
            assert ids == sorted(ids) and len(set(ids)) == len(ids)  # ids never go back
            errors = [e for e in listener.events("error") if e.get("utterance_id") in (speaking, queued)]
            assert [e["utterance_id"] for e in errors] == [speaking]  # why it was cut off


async def test_killing_a_daemon_that_is_not_the_speaker_costs_the_others_nothing():
    with trio.fail_after(60):
        async with group() as (daemons, fake, _):
            speaker, (doomed, survivor) = await roles(daemons)
            fake.stall_after = 9600
            async with listening(speaker) as on_speaker, listening(survivor) as on_survivor, listening(doomed) as sender:
                await sender.send(type="send_message", text="Sent from the daemon that dies.")
                utt = (await sender.until("accepted"))["utterance_id"]
                await on_survivor.until("utterance_started", utterance_id=utt)
                await fake.stalled.wait()
                doomed.kill()
                await doomed.process.wait()
                fake.release.set()
                ends = [await listener.until("utterance_finished", utterance_id=utt) for listener in (on_speaker, on_survivor)]
    assert all(e["status"] == "ok" for e in ends)
    assert on_speaker.frames() == on_survivor.frames()
    assert len(on_survivor.frames()) == ends[0]["chunks"]
    ids = chunk_ids(on_survivor.frames())
    assert ids[-1] == ends[0]["last_chunk_id"] and ids == list(range(ids[0], ids[0] + len(ids)))


async def test_without_the_broker_every_daemon_is_not_ready_and_recovers_when_it_returns():
    with trio.fail_after(90):
        async with group() as (daemons, fake, redis):
            async with httpx.AsyncClient() as http, listening(daemons[0]) as listener:
                assert [await d.ready() for d in daemons] == [200, 200, 200]
                terms = took_over(daemons)
                fake.stall_after = 9600  # an utterance in the middle when the broker goes
                async with listening(daemons[2]) as early:
                    await early.send(type="send_message", text="Cut off by the outage.")
                    cut_id = (await early.until("accepted"))["utterance_id"]
                await fake.stalled.wait()
                await listener.until_frames(2)
                await redis.stop()
                for daemon in daemons:
                    await daemon.wait_for("broker.down")
                down = [await d.ready() for d in daemons]
                reasons = [(await http.get(d.http + "/readyz")).json()["reason"] for d in daemons]
                async with listening(daemons[1]) as client:
                    await client.send(type="send_message", text="Nobody can speak this.")
                    refused = await client.until("error")
                spoken = await http.post(daemons[2].http + "/v1/speak", json={"text": "Nor this."})
                fake.stall_after = None
                fake.release.set()
                await redis.start()
                await next_speaker(daemons, terms)
                cut = await listener.until("utterance_finished", utterance_id=cut_id)
                while [await d.ready() for d in daemons] != [200, 200, 200]:
                    await trio.sleep(0.1)  # (each daemon's next lease tick, within a second)
                async with listening(daemons[1]) as sender:
                    await sender.send(type="send_message", text="Spoken once the broker is back.")
                    utt = (await sender.until("accepted"))["utterance_id"]
                    back = await listener.until("utterance_finished", utterance_id=utt)
    assert down == [503, 503, 503]
    assert all("broker" in reason for reason in reasons)
    assert refused["code"] == "provider_unavailable"
    assert spoken.status_code == 503 and spoken.json()["code"] == "provider_unavailable"
    assert back["status"] == "ok" and back["chunks"] > 0
    # The utterance the outage cut off ended (partial: some of it was heard), and the chunk
    # ids went on after it although the restarted broker remembered nothing.
    assert cut["status"] == "partial" and cut["chunks"] >= 2
    ids = chunk_ids(listener.frames())
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_speechcast_listen_moves_to_the_next_daemon_when_its_own_dies(tmp_path):
    out = tmp_path / "heard.wav"
    with trio.fail_after(60):
        async with group() as (daemons, fake, _):
            speaker, (doomed, other) = await roles(daemons)
            urls = f"{doomed.ws()},{other.ws()}"
            listen = await trio.lowlevel.open_process(
                [str(SPEECHCAST), "listen", "--url", urls, "--out", str(out), "--count", "2"], stderr=subprocess.PIPE
            )
            lines = LineReader(listen.stderr)
            assert (await lines.line()).startswith(f"listening on {doomed.ws()}")
            async with listening(speaker) as sender:
                await sender.send(type="send_message", text="Heard through the first daemon.")
                await sender.until("utterance_finished")
                assert "ok" in await lines.line()
                doomed.kill()
                while not (await lines.line()).startswith(f"listening on {other.ws()}"):
                    pass  # ("... closed the connection; trying the next daemon")
                await sender.send(type="send_message", text="Heard through the second daemon.")
                await sender.until("utterance_finished", 2)
            assert await listen.wait() == 0
    with wave.open(str(out)) as wav:
        assert wav.getnframes() == 2 * 24000  # both utterances, 1 s each, whole


async def test_a_speaker_stopped_with_sigterm_finishes_its_utterance_and_hands_over():
    with trio.fail_after(60):
        async with group() as (daemons, fake, _):
            speaker, (edge1, edge2) = await roles(daemons)
            terms = took_over(daemons)
            fake.stall_after = 9600
            async with listening(edge1) as sender, listening(speaker) as on_speaker:
                await sender.send(type="send_message", text="Finished within the grace.")
                utt = (await sender.until("accepted"))["utterance_id"]
                await fake.stalled.wait()
                speaker.process.send_signal(signal.SIGTERM)
                await speaker.wait_for("daemon.stopping")
                fake.release.set()
                finished = await sender.until("utterance_finished", utterance_id=utt)
                assert await speaker.process.wait() == 0
                successor = await next_speaker(daemons, terms)
                await sender.send(type="send_message", text="Spoken by the next speaker.")
                after = (await sender.until("accepted", 2))["utterance_id"]
                spoken = await sender.until("utterance_finished", utterance_id=after)
                with pytest.raises(ConnectionClosed):  # the speaker's own listeners are told it went away
                    while True:
                        on_speaker.messages.append(await on_speaker.ws.get_message())
    assert finished["status"] == "ok"
    assert speaker.logged("speaker.released")
    assert speaker.logged("daemon.stopped")[0]["graceful"] is True
    assert successor in (edge1, edge2) and spoken["status"] == "ok"
    assert [e["utterance_id"] for e in on_speaker.events("utterance_finished")] == [utt]
    assert on_speaker.ws.closed is not None and on_speaker.ws.closed.code == 1001


async def test_streamed_text_sent_to_an_edge_is_spoken_to_everyone():
    with trio.fail_after(60):
        async with group() as (daemons, fake, _):
            speaker, (edge1, edge2) = await roles(daemons)
            async with listening(speaker) as listener, listening(edge1, "?subscribe=0") as writer:
                await writer.send(type="text_start", text="Streamed over a WebSocket, ")
                accepted = await writer.until("accepted")
                await writer.send(type="text_append", utterance_id=accepted["utterance_id"], text="to another daemon.")
                await writer.send(type="text_end", utterance_id=accepted["utterance_id"])
                by_socket = await listener.until("utterance_finished", utterance_id=accepted["utterance_id"])
                async with httpx.AsyncClient() as http:
                    answer = await http.post(
                        edge2.http + "/v1/speak",
                        content=b"Streamed as an HTTP body. It ends with the request.",
                        headers={"Content-Type": "text/plain"},
                    )
                by_http = await listener.until("utterance_finished", utterance_id=answer.json()["utterance_id"])
    assert accepted["streaming"] is True and by_socket["status"] == "ok"
    assert answer.status_code == 202 and answer.json()["streaming"] is True and by_http["status"] == "ok"
    spoken = [r.json["input"] for r in fake.speech_requests]
    assert "".join(spoken[:1]).startswith("Streamed over a WebSocket")


async def test_an_edge_stopped_with_sigterm_closes_its_own_listeners_and_nobody_else_notices():
    with trio.fail_after(60):
        async with group() as (daemons, fake, _):
            speaker, (stopping, other) = await roles(daemons)
            terms = took_over(daemons)
            async with listening(stopping) as leaving, listening(other) as staying:
                stopping.process.send_signal(signal.SIGTERM)
                assert await stopping.process.wait() == 0
                with pytest.raises(ConnectionClosed):
                    while True:
                        leaving.messages.append(await leaving.ws.get_message())
                await staying.send(type="send_message", text="Still spoken to the others.")
                done = await staying.until("utterance_finished")
    assert leaving.ws.closed is not None and leaving.ws.closed.code == 1001
    assert done["status"] == "ok"
    assert took_over(daemons) == terms  # the speaker never changed
    assert stopping.logged("daemon.stopped")[0]["graceful"] is True
