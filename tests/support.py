"""Test doubles and clients shared by the tests: scripted providers below the network,
and a WebSocket client that records what a user's client would see."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import WebSocketConnection

from pipeline import protocol
from pipeline.audio import read_wav
from pipeline.commands import TTSProvider
from pipeline.config import Settings
from pipeline.errors import ProviderError
from pipeline.providers.base import Provider
from pipeline.providers.piper import PiperProvider
from pipeline.providers.registry import ProviderSet


def ws_url(port: int, query: str = "") -> str:
    """The WebSocket address of a daemon listening on loopback `port`."""
    return f"ws://127.0.0.1:{port}/{query}"


def tone(n_samples: int, value: int = 1000) -> bytes:
    """Recognisable PCM: a ramp so that any reordering or loss shows."""
    return b"".join(((value + i) % 30000).to_bytes(2, "little", signed=True) for i in range(n_samples))


class ScriptedProvider(Provider):
    """A provider that yields scripted PCM per piece: `script(text)` returns the items to
    yield (bytes, or a ProviderError to raise there). `seconds` is a fake synthesis time
    per item (use it with MockClock). `gate`, when set, is awaited before the first item."""

    def __init__(
        self,
        name: TTSProvider = TTSProvider.PIPER,
        *,
        sample_rate: int = 24000,
        script: Callable[[str], list[bytes | ProviderError]] | None = None,
        seconds: float = 0.0,
    ) -> None:
        self.name = name
        self.sample_rate = sample_rate
        self.default_voice = "scripted"
        self.script = script or (lambda text: [tone(2400)])
        self.seconds = seconds
        self.gate: trio.Event | None = None
        self.texts: list[str] = []
        self.produced = bytearray()
        self.closed = 0
        self.reason: str | None = None

    def unavailable_reason(self) -> str | None:
        return self.reason

    async def aclose(self) -> None:
        self.closed += 1

    async def synthesize(self, text: str, voice: str | None, speed: float | None) -> AsyncIterator[bytes]:
        self.texts.append(text)
        if self.gate is not None:
            await self.gate.wait()
        for item in self.script(text):
            await trio.sleep(self.seconds)
            if isinstance(item, ProviderError):
                raise item
            self.produced += item
            yield item


class HeldVoice(ScriptedProvider):
    """Speaks one block of audio, then holds until `release` is set, then one more: an
    utterance that is "in the middle" for as long as a test needs."""

    def __init__(self) -> None:
        super().__init__()
        self.release = trio.Event()

    async def synthesize(self, text: str, voice: str | None, speed: float | None) -> AsyncIterator[bytes]:
        self.texts.append(text)
        yield tone(4800)
        await self.release.wait()
        yield tone(4800)


class RecordingPiper(PiperProvider):
    """The real embedded voice, remembering every byte it produced."""

    def __init__(self) -> None:
        super().__init__()
        self.produced = bytearray()
        self.pieces: list[tuple[str, bytearray]] = []  # (text, its audio) in call order

    async def synthesize(self, text: str, voice: str | None, speed: float | None) -> AsyncIterator[bytes]:
        audio = bytearray()
        self.pieces.append((text, audio))
        async for pcm in super().synthesize(text, voice, speed):
            self.produced += pcm
            audio += pcm
            yield pcm


def provider_set(settings: Settings, *providers: Provider) -> ProviderSet:
    return ProviderSet({p.name: p for p in providers}, settings)


@dataclass
class Heard:
    """Everything one client received, in order."""

    events: list[dict[str, Any]] = field(default_factory=list)
    frames: list[protocol.VoiceFrame] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # event types and "chunk" in arrival order

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    def pcm(self) -> bytes:
        return b"".join(read_wav(f.audio)[1] for f in self.frames)


async def receive_until(
    ws: WebSocketConnection, heard: Heard, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Read messages into `heard` until an event satisfies `done`; return that event."""
    while True:
        message = await ws.get_message()
        if isinstance(message, bytes):
            heard.frames.append(protocol.decode_voice_frame(message))
            heard.order.append("chunk")
            continue
        event = json.loads(message)
        heard.events.append(event)
        heard.order.append(event["type"])
        if done(event):
            return event


def finished(utterance_id: str | None = None) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["type"] == "utterance_finished" and utterance_id in (None, e["utterance_id"])


def of_type(kind: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["type"] == kind


async def send(ws: WebSocketConnection, **message: Any) -> None:
    await ws.send_message(json.dumps(message))
