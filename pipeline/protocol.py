"""The wire protocol of DESIGN.md section 4: client JSON to commands, events to JSON,
and the binary VOICE_DATA frame (with the seed's optional zlib compression).

Intake uses `parse_client_message`; the broadcaster uses the event and frame encoders;
clients (the CLI, tests, benchmarks) use the decoders.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Final

from pipeline import __version__
from pipeline.commands import Cancel, Close, Command, Initialize, SendMessage, SetTTSProvider, TTSProvider
from pipeline.errors import CommandError
from pipeline.events import (
    Accepted,
    AudioFormat,
    Cancelled,
    Closed,
    ErrorEvent,
    Hello,
    ProviderChanged,
    Ready,
    ServerEvent,
    UtteranceFinished,
    UtteranceStarted,
)

MAX_TEXT_CHARS: Final = 4096
MIN_SPEED: Final = 0.25
MAX_SPEED: Final = 4.0
VOICE_DATA: Final = 0x00000002
# 0x00000001 is the seed's position/velocity update: reserved, never sent by us.
POSITION_UPDATE: Final = 0x00000001
_HEADER: Final = struct.Struct("<IIB")
# Below this size zlib's header and checksum outweigh any saving (the seed's rule).
COMPRESS_MIN_BYTES: Final = 512
ZLIB_SECOND_BYTES: Final = frozenset({0x01, 0x5E, 0x9C, 0xDA})
PROVIDER_NAMES: Final = tuple(p.value for p in TTSProvider)


# ---------------------------------------------------------------- client → server


def parse_client_message(raw: str) -> Command:
    """Validate one client text frame and return its command.

    Error handling: raises CommandError with the protocol code (invalid_json,
    invalid_command, empty_text, text_too_long, unknown_provider).
    """
    try:
        message = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise CommandError("the message is not valid JSON", code="invalid_json") from None
    if not isinstance(message, dict):
        raise CommandError("a command is a JSON object with a \"type\"", code="invalid_command")
    kind = message.get("type")
    if kind in ("send_message", "tts"):
        return SendMessage(
            text=_text(message),
            voice=_optional(message, "voice", str),
            speed=_speed(message),
            provider=_provider(message, required=False),
        )
    if kind == "initialize":
        return Initialize()
    if kind == "set_tts_provider":
        provider = _provider(message, required=True)
        assert provider is not None
        return SetTTSProvider(provider)
    if kind == "close":
        return Close()
    if kind == "cancel":
        return Cancel(all=bool(_optional(message, "all", bool)))
    if kind is None:
        raise CommandError("the command has no \"type\"", code="invalid_command")
    raise CommandError(
        f"unknown command type {str(kind)[:40]!r}; use initialize, send_message, "
        "set_tts_provider, close or cancel",
        code="invalid_command",
    )


def _optional(message: dict[str, Any], field: str, kind: type) -> Any:
    value = message.get(field)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise CommandError(f"\"{field}\" must be a {kind.__name__}", code="invalid_command")
    return value


def _text(message: dict[str, Any]) -> str:
    if "text" not in message:
        raise CommandError("\"text\" is required", code="invalid_command")
    text = message["text"]
    if not isinstance(text, str):
        raise CommandError("\"text\" must be a string", code="invalid_command")
    if not text.strip():
        raise CommandError("\"text\" is empty", code="empty_text")
    if len(text) > MAX_TEXT_CHARS:
        raise CommandError(
            f"\"text\" has {len(text)} characters; at most {MAX_TEXT_CHARS} are accepted",
            code="text_too_long",
        )
    return text


def _speed(message: dict[str, Any]) -> float | None:
    speed = message.get("speed")
    if speed is None:
        return None
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not math.isfinite(speed):
        raise CommandError("\"speed\" must be a number", code="invalid_command")
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise CommandError(f"\"speed\" must be between {MIN_SPEED} and {MAX_SPEED}", code="invalid_command")
    return float(speed)


def _provider(message: dict[str, Any], *, required: bool) -> TTSProvider | None:
    name = message.get("provider")
    if name is None:
        if required:
            raise CommandError("\"provider\" is required", code="invalid_command")
        return None
    if not isinstance(name, str):
        raise CommandError("\"provider\" must be a string", code="invalid_command")
    try:
        return TTSProvider(name)
    except ValueError:
        raise CommandError(
            f"unknown provider {name[:40]!r}; use {', '.join(PROVIDER_NAMES)}", code="unknown_provider"
        ) from None


# ---------------------------------------------------------------- server → client events

# The wire `type` of each event; the JSON of every event is built below and nowhere else.
EVENT_TYPES: Final[dict[type, str]] = {
    Hello: "hello",
    Ready: "ready",
    Accepted: "accepted",
    UtteranceStarted: "utterance_started",
    UtteranceFinished: "utterance_finished",
    ProviderChanged: "provider_changed",
    ErrorEvent: "error",
    Cancelled: "cancelled",
    Closed: "closed",
}


def as_dict(event: ServerEvent, audio_format: AudioFormat = AudioFormat.WAV) -> dict[str, Any]:
    """The event as the JSON object of DESIGN.md section 4 (`audio_format`: the receiving
    subscriber's, for utterance_started)."""
    fields: dict[str, Any] = {"type": EVENT_TYPES[type(event)], **dataclasses.asdict(event)}
    match event:
        case Hello():
            fields.update(version=__version__, providers=list(PROVIDER_NAMES))
        case Ready():
            fields["providers"] = list(PROVIDER_NAMES)
        case UtteranceStarted():
            fields["format"] = audio_format
        case Cancelled():
            fields["utterance_ids"] = list(event.utterance_ids)
        case ErrorEvent():
            for optional in ("utterance_id", "recovered", "retry_after"):
                if fields[optional] is None:
                    del fields[optional]
    return fields


def render(event: ServerEvent, audio_format: AudioFormat = AudioFormat.WAV) -> str:
    """The event's text frame."""
    return json.dumps(as_dict(event, audio_format), separators=(",", ":"))


# ---------------------------------------------------------------- VOICE_DATA frames


@dataclass(frozen=True)
class VoiceFrame:
    """One decoded VOICE_DATA frame."""

    chunk_id: int
    is_final: bool
    audio: bytes


def encode_voice_frame(chunk_id: int, is_final: bool, audio: bytes) -> bytes:
    """The seed's binary layout: u32 type, u32 chunkId, u8 isFinal, then the audio."""
    return _HEADER.pack(VOICE_DATA, chunk_id & 0xFFFFFFFF, 1 if is_final else 0) + audio


def compress_frame(frame: bytes) -> bytes:
    """zlib-compress a frame when it is at least 512 bytes and that makes it smaller."""
    if len(frame) < COMPRESS_MIN_BYTES:
        return frame
    packed = zlib.compress(frame)
    return packed if len(packed) < len(frame) else frame


def is_compressed(data: bytes) -> bool:
    """A compressed frame starts with a zlib header; a raw one starts with 0x02."""
    return len(data) >= 2 and data[0] == 0x78 and data[1] in ZLIB_SECOND_BYTES


def decode_voice_frame(data: bytes) -> VoiceFrame:
    """Decode a (possibly compressed) VOICE_DATA frame; ValueError if it is not one."""
    if is_compressed(data):
        data = zlib.decompress(data)
    if len(data) < _HEADER.size:
        raise ValueError(f"frame of {len(data)} bytes is shorter than its header")
    kind, chunk_id, final = _HEADER.unpack_from(data)
    if kind != VOICE_DATA:
        raise ValueError(f"message type {kind:#x} is not VOICE_DATA")
    return VoiceFrame(chunk_id, final == 1, data[_HEADER.size:])
