"""format=opus (DESIGN.md section 12): what an opus subscriber receives, decoded with PyAV
as a client would, against what a pcm subscriber of the same utterance receives."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import wave
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs
from trio_websocket import open_websocket_url

from actors.broadcaster import Broadcaster
from actors.intake import HandshakeError, parse_options
from pipeline import opus, protocol
from pipeline.config import ConfigError, Settings, load_settings
from pipeline.daemon import running_daemon
from pipeline.errors import ProviderFailed
from pipeline.events import AudioFormat, UtteranceStarted
from pipeline.flow import Frame, Join, SubscriberOptions
from pipeline.providers.openai_compat import kokoros_provider
from tests.fakes.tts_servers import FakeKokoros
from tests.fakes.tts_servers import tone as sine
from tests.support import HeldVoice, RecordingPiper, provider_set, send, tone
from tests.test_formats import RecordingConnection
from tests.test_network_daemon import settings_for
from tests.test_walkthrough import SPEECHCAST, TEXT, LineReader, start_daemon

BASE = Settings(port=0, http_port=0)
RATE = BASE.sample_rate
ENVELOPE_MS = 20


@dataclass
class Listener:
    """One subscriber's view of one utterance: its announcement, raw frames, ending."""

    started: dict[str, Any] = field(default_factory=dict)
    frames: list[protocol.VoiceFrame] = field(default_factory=list)
    finished: dict[str, Any] = field(default_factory=dict)
    got_frame: trio.Event = field(default_factory=trio.Event)

    def pcm(self) -> bytes:
        """The utterance as s16le at the announced rate, however it was sent."""
        if self.started["format"] == "opus":
            payloads = [f.audio for f in self.frames]
            return opus.decode_utterance(payloads, self.started["pre_skip"], self.started["sample_rate"])
        return b"".join(f.audio for f in self.frames)

    def shape(self) -> list[tuple[int, bool]]:
        return [(f.chunk_id, f.is_final) for f in self.frames]


async def listen(url: str, listener: Listener, ready: trio.Semaphore) -> None:
    async with open_websocket_url(url) as ws:
        await ws.get_message()  # hello
        ready.release()
        while True:
            message = await ws.get_message()
            if isinstance(message, bytes):
                listener.frames.append(protocol.decode_voice_frame(message))
                listener.got_frame.set()
                continue
            event = json.loads(message)
            if event["type"] == "utterance_started":
                listener.started = event
            if event["type"] == "utterance_finished":
                listener.finished = event
                return


def envelope(pcm: bytes) -> np.ndarray:
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    window = RATE * ENVELOPE_MS // 1000
    whole = len(samples) // window * window
    return np.sqrt((samples[:whole].reshape(-1, window) ** 2).mean(axis=1))


def assert_same_utterance(pcm: Listener, ogg: Listener) -> None:
    """Same chunks, same ending, and opus audio as long as the PCM within one 20 ms frame."""
    assert ogg.started["codec"] == "opus" and ogg.started["format"] == "opus"
    assert ogg.started["sample_rate"] == pcm.started["sample_rate"] == RATE
    assert ogg.started["pre_skip"] == 312  # libopus's look-ahead at 48 kHz
    assert "codec" not in pcm.started and "pre_skip" not in pcm.started
    assert ogg.shape() == pcm.shape()
    assert ogg.finished == pcm.finished
    assert all(f.audio for f in ogg.frames)
    heard, sent = len(ogg.pcm()) // 2, len(pcm.pcm()) // 2
    assert abs(heard - sent) <= RATE * 20 // 1000, (heard, sent)


async def hear(daemon_port: int, speak) -> tuple[Listener, Listener]:
    """A pcm and an opus subscriber on the same utterance(s); `speak(control)` makes it."""
    pcm, ogg = Listener(), Listener()
    ready = trio.Semaphore(0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(listen, f"ws://127.0.0.1:{daemon_port}/?format=pcm", pcm, ready)
        nursery.start_soon(listen, f"ws://127.0.0.1:{daemon_port}/?format=opus&compress=1", ogg, ready)
        for _ in range(2):
            await ready.acquire()
        async with open_websocket_url(f"ws://127.0.0.1:{daemon_port}/?subscribe=0") as control:
            await speak(control, pcm)
    return pcm, ogg


async def test_opus_of_real_piper_speech_follows_the_pcm_with_the_same_chunks():
    piper = RecordingPiper()
    text = "Opus carries the same words in a fifteenth of the bytes. Listen to how it follows the voice."

    async def speak(control, _pcm: Listener) -> None:
        await send(control, type="send_message", text=text)

    with trio.fail_after(60):
        async with running_daemon(BASE, provider_set(BASE, piper)) as daemon:
            pcm, ogg = await hear(daemon.port, speak)
    assert pcm.finished["status"] == "ok" and len(pcm.frames) > 5
    assert_same_utterance(pcm, ogg)
    a, b = envelope(pcm.pcm()), envelope(ogg.pcm())
    n = min(len(a), len(b))
    correlation = float(np.corrcoef(a[:n], b[:n])[0, 1])
    assert correlation >= 0.9, correlation
    opus_bytes = sum(len(f.audio) for f in ogg.frames)
    assert opus_bytes * 10 <= len(pcm.pcm())  # at 32 kbit/s: about 1/12 of 384 kbit/s


async def test_a_failover_mid_utterance_gives_one_decodable_opus_stream():
    # Every Kokoros answer breaks off halfway; the rest of the text goes to the embedded voice.
    fake = FakeKokoros(pcm=sine(800), break_after=19200)
    text = "The first sentence is from Kokoros. The second sentence comes from the embedded voice."

    async def speak(control, _pcm: Listener) -> None:
        await send(control, type="send_message", text=text)

    with trio.fail_after(60):
        async with fake.running() as url, running_daemon(settings_for(url, fallback=("piper",))) as daemon:
            pcm, ogg = await hear(daemon.port, speak)
    assert pcm.finished["status"] == "partial" and pcm.started["provider"] == "kokoros"
    assert_same_utterance(pcm, ogg)
    # Both voices are heard in the opus stream: its loudness follows the PCM's.
    a, b = envelope(pcm.pcm()), envelope(ogg.pcm())
    n = min(len(a), len(b))
    assert float(np.corrcoef(a[:n], b[:n])[0, 1]) >= 0.9


async def test_a_cancel_mid_utterance_leaves_a_decodable_opus_stream():
    voice = HeldVoice()

    async def speak(control, pcm: Listener) -> None:
        await send(control, type="send_message", text="Held in the middle.")
        await pcm.got_frame.wait()
        await send(control, type="cancel")
        voice.release.set()

    with trio.fail_after(30):
        async with running_daemon(BASE, provider_set(BASE, voice)) as daemon:
            pcm, ogg = await hear(daemon.port, speak)
    assert pcm.finished["status"] == "cancelled" and pcm.frames
    assert_same_utterance(pcm, ogg)
    assert not any(f.is_final for f in ogg.frames)


async def test_a_late_opus_subscriber_gets_a_decodable_rest_of_the_utterance():
    voice = HeldVoice()
    with trio.fail_after(30):
        async with running_daemon(BASE, provider_set(BASE, voice)) as daemon:
            early, late = Listener(), Listener()
            ready = trio.Semaphore(0)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(listen, f"ws://127.0.0.1:{daemon.port}/?format=pcm", early, ready)
                await ready.acquire()
                async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/?subscribe=0") as control:
                    await send(control, type="send_message", text="Joined in the middle.")
                    await early.got_frame.wait()
                    nursery.start_soon(listen, f"ws://127.0.0.1:{daemon.port}/?format=opus", late, ready)
                    await ready.acquire()
                    voice.release.set()
    assert late.started["codec"] == "opus" and late.finished == early.finished
    assert late.shape() == early.shape()[-len(late.frames):] and late.frames[-1].is_final
    rest = b"".join(f.audio for f in early.frames[-len(late.frames):])
    assert abs(len(late.pcm()) - len(rest)) <= 2 * RATE * 20 // 1000


async def test_opus_is_encoded_once_per_chunk_for_all_its_subscribers():
    inbox_send, inbox_recv = trio.open_memory_channel(100)
    connections = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(Broadcaster(BASE, inbox_recv).run)
        for conn_id, (fmt, compress) in enumerate([("opus", False), ("opus", True), ("opus", False), ("pcm", False)]):
            connections[conn_id] = RecordingConnection()
            await inbox_send.send(Join(conn_id, connections[conn_id], SubscriberOptions(format=fmt, compress=compress)))
        await inbox_send.send(Frame("u1", 0, True, tone(4800, value=0)))
        with trio.fail_after(10):
            for connection in connections.values():
                await connection.got_frame.wait()
        nursery.cancel_scope.cancel()
    frames = [[d for d in c.sent if isinstance(d, bytes)][0] for c in connections.values()]
    assert frames[0] is frames[1] is frames[2] and frames[0] != frames[3]
    packets = opus.split_payload(protocol.decode_voice_frame(frames[0]).audio)
    assert len(packets) == 10 + 1  # 200 ms in 20 ms packets, and the flushed look-ahead


def test_format_opus_is_accepted_and_compress_does_not_apply_to_it():
    assert parse_options("/?format=opus") == SubscriberOptions(format="opus")
    assert parse_options("/?format=opus&compress=1") == SubscriberOptions(format="opus", compress=False)
    with pytest.raises(HandshakeError) as refused:
        parse_options("/?format=ogg")
    assert refused.value.status == 400 and "opus" in str(refused.value)


@pytest.mark.parametrize("bitrate", ["5999", "510001", "fast"])
def test_opus_bitrate_outside_what_libopus_takes_is_refused(bitrate):
    with pytest.raises(ConfigError, match="opus_bitrate"):
        load_settings({}, {"SPEECHCAST_OPUS_BITRATE": bitrate}, None)


def test_every_chunk_split_and_rate_encodes_the_whole_utterance():
    # Chunks that are not whole 20 ms frames carry the rest over; other rates are resampled.
    for rate in (24000, 16000, 22050):
        encoder = opus.OpusEncoder(rate, 32000)
        audio = sine(1000, rate=rate)
        cuts = [0, 470, 1000, 9600, 20002, len(audio)]
        payloads = [
            encoder.encode_now(audio[a:b], final=b == len(audio)) for a, b in zip(cuts, cuts[1:])
        ]
        pcm = opus.decode_utterance(payloads, encoder.pre_skip, rate)
        assert 0 <= len(pcm) - len(audio) <= 2 * rate * 20 // 1000, rate


async def test_listen_format_opus_writes_the_decoded_speech(tmp_path):
    out = tmp_path / "opus.wav"
    with trio.fail_after(60):
        daemon, port = await start_daemon()
        try:
            url = f"ws://127.0.0.1:{port}"
            listen = await trio.lowlevel.open_process(
                [SPEECHCAST, "listen", "--url", url, "--out", str(out), "--format", "opus"], stderr=subprocess.PIPE
            )
            assert (await LineReader(listen.stderr).line()).startswith("listening on")
            said = await trio.run_process([SPEECHCAST, "say", TEXT, "--url", url], capture_stdout=True)
            assert await listen.wait() == 0
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert await daemon.wait() == 0
    audio_s = float(said.stdout.decode().split(", ")[1].split(" s of audio")[0])
    with wave.open(str(out)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 24000)
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float64)
    assert abs(samples.size / 24000 - audio_s) <= 0.02
    windows = samples[: samples.size // 480 * 480].reshape(-1, 480)
    assert (np.sqrt((windows**2).mean(axis=1)) > 500).mean() > 0.5  # speech, not silence


def test_utterance_started_carries_codec_and_pre_skip_for_opus_only():
    started = UtteranceStarted("u1", "piper", "joe", 24000, 7)
    opus_started = dataclasses.replace(started, codec="opus", pre_skip=312)
    as_opus = json.loads(protocol.render(opus_started, AudioFormat.OPUS))
    assert (as_opus["format"], as_opus["codec"], as_opus["pre_skip"], as_opus["sample_rate"]) == ("opus", "opus", 312, 24000)
    assert not {"codec", "pre_skip"} & set(json.loads(protocol.render(started, AudioFormat.PCM)))
    assert protocol.decode_event(protocol.render(opus_started, AudioFormat.OPUS)) == opus_started


class BreakingPiper(RecordingPiper):
    """The real embedded voice, whose first piece breaks off after its first audio."""

    async def synthesize(self, text, voice, speed):
        broke = bool(self.pieces)
        async for pcm in super().synthesize(text, voice, speed):
            yield pcm
            if not broke:
                raise ProviderFailed("the voice broke off")


async def test_a_failover_from_piper_to_an_http_voice_gives_one_decodable_opus_stream():
    fake = FakeKokoros(pcm=sine(600))
    text = "The embedded voice starts this sentence. The Kokoros server speaks the second one. And the third."

    async def speak(control, _pcm: Listener) -> None:
        await send(control, type="send_message", text=text)

    with trio.fail_after(60):
        async with fake.running() as url:
            settings = dataclasses.replace(settings_for(url, fallback=("kokoros",)), provider="piper")
            piper = BreakingPiper()
            async with running_daemon(settings, provider_set(settings, piper, kokoros_provider(settings))) as daemon:
                pcm, ogg = await hear(daemon.port, speak)
    assert pcm.started["provider"] == "piper" and pcm.finished["status"] == "partial"
    assert fake.speech_requests  # the HTTP voice spoke the rest
    assert_same_utterance(pcm, ogg)
    a, b = envelope(pcm.pcm()), envelope(ogg.pcm())
    n = min(len(a), len(b))
    assert float(np.corrcoef(a[:n], b[:n])[0, 1]) >= 0.9


@given(st.lists(st.binary(max_size=1275), max_size=12))
def test_a_payload_splits_back_into_its_packets(packets):
    assert opus.split_payload(opus.payload(packets)) == packets


@given(st.binary(min_size=1, max_size=40))
def test_a_payload_cut_short_is_refused_not_misread(data):
    payload = opus.payload([data])
    with pytest.raises(ValueError):
        opus.split_payload(payload[:-1])


async def test_a_libopus_failure_costs_one_opus_chunk_and_nothing_else(monkeypatch):
    real = opus.encode_chunk
    calls = []

    async def failing_once(encoder, pcm, *, final):
        calls.append(final)
        if len(calls) == 1:
            raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")
        return await real(encoder, pcm, final=final)

    class ThreeFrames(RecordingConnection):
        def __init__(self) -> None:
            super().__init__()
            self.all_in = trio.Event()

        async def send_message(self, data: str | bytes) -> None:
            await super().send_message(data)
            if len([d for d in self.sent if isinstance(d, bytes)]) == 3:
                self.all_in.set()

    monkeypatch.setattr(opus, "encode_chunk", failing_once)
    inbox_send, inbox_recv = trio.open_memory_channel(100)
    ogg, pcm = ThreeFrames(), ThreeFrames()
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(Broadcaster(BASE, inbox_recv).run)
            await inbox_send.send(Join(0, ogg, SubscriberOptions(format="opus")))
            await inbox_send.send(Join(1, pcm, SubscriberOptions(format="pcm")))
            for chunk_id in range(3):
                await inbox_send.send(Frame("u1", chunk_id, chunk_id == 2, tone(4800, value=0)))
            with trio.fail_after(10):
                await ogg.all_in.wait()
                await pcm.all_in.wait()
            nursery.cancel_scope.cancel()
    frames = [protocol.decode_voice_frame(d) for d in ogg.sent if isinstance(d, bytes)]
    assert [(f.chunk_id, f.is_final) for f in frames] == [(0, False), (1, False), (2, True)]
    assert [len(opus.split_payload(f.audio)) for f in frames] == [0, 10, 11]
    assert len([d for d in pcm.sent if isinstance(d, bytes)]) == 3
    assert [e["event"] for e in logs if e["event"].startswith("opus.")] == ["opus.encode_failed"]
