"""The wire protocol of DESIGN.md section 4, server to client: events to JSON (the only
place that JSON is built) and the binary VOICE_DATA frame (with the seed's optional zlib
compression); and, for clients (the CLI, tests, benchmarks), their decoders.

What clients send is read by `pipeline.client_input`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Final

from pipeline import __version__
from pipeline.commands import SendMessage, TextAppend, TextEnd, TextStart, TTSProvider
from pipeline.events import (
    Accepted,
    AudioFormat,
    Cancelled,
    Closed,
    ErrorCode,
    ErrorEvent,
    Hello,
    ProviderChanged,
    Ready,
    ServerEvent,
    Status,
    UtteranceFinished,
    UtteranceStarted,
    Visemes,
    VisemeTime,
    Words,
    WordTime,
)
from pipeline.session import SessionState

VOICE_DATA: Final = 0x00000002
# 0x00000001 is the seed's position/velocity update: reserved, never sent by us.
POSITION_UPDATE: Final = 0x00000001
_HEADER: Final = struct.Struct("<IIB")
# Below this size zlib's header and checksum outweigh any saving (the seed's rule).
COMPRESS_MIN_BYTES: Final = 512
ZLIB_SECOND_BYTES: Final = frozenset({0x01, 0x5E, 0x9C, 0xDA})
PROVIDER_NAMES: Final = tuple(p.value for p in TTSProvider)


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
    Words: "words",
    Visemes: "visemes",
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
            for optional in ("codec", "pre_skip"):  # an opus subscriber's only
                if fields[optional] is None:
                    del fields[optional]
        case Accepted(streaming=False):
            del fields["streaming"]
        case Cancelled():
            fields["utterance_ids"] = list(event.utterance_ids)
        case ErrorEvent():
            for optional in ("utterance_id", "recovered", "retry_after"):
                if fields[optional] is None:
                    del fields[optional]
    return fields


def accepted_body(event: Accepted) -> dict[str, Any]:
    """The body of `POST /v1/speak`'s 202: the `accepted` event without its `type`."""
    fields = as_dict(event)
    del fields["type"]
    return fields


def render(event: ServerEvent, audio_format: AudioFormat = AudioFormat.WAV) -> str:
    """The event's text frame."""
    return json.dumps(as_dict(event, audio_format), separators=(",", ":"))


# ---------------------------------------------------------------- the client's side (CLI, tests)

_EVENT_CLASSES: Final[dict[str, type]] = {name: cls for cls, name in EVENT_TYPES.items()}
# Fields whose JSON string becomes an enum member (an unknown value stays the plain string).
_ENUM_FIELDS: Final[dict[str, type]] = {"code": ErrorCode, "status": Status, "session": SessionState}
# List fields whose items are objects of their own (`words`, `visemes`: DESIGN.md section 11).
_ITEM_FIELDS: Final[dict[str, type]] = {"words": WordTime, "visemes": VisemeTime}


def decode_event(text: str) -> ServerEvent | None:
    """A server event as a client reads it; None for an event type this version does not
    know (clients ignore those). Fields it does not know are ignored too.

    Error handling: ValueError (or TypeError) when the text is not such an event.
    """
    data = json.loads(text)
    cls = _EVENT_CLASSES.get(str(data.get("type"))) if isinstance(data, dict) else None
    if cls is None:
        return None
    fields: dict[str, Any] = {}
    for spec in dataclasses.fields(cls):
        if spec.name in data:
            value = data[spec.name]
            if spec.name in _ENUM_FIELDS:
                with contextlib.suppress(ValueError):
                    value = _ENUM_FIELDS[spec.name](value)
            if spec.name in _ITEM_FIELDS and isinstance(value, list):
                value = [_ITEM_FIELDS[spec.name](**item) for item in value]
            fields[spec.name] = tuple(value) if isinstance(value, list) else value
    event: ServerEvent = cls(**fields)
    return event


def encode_command(command: SendMessage | TextStart | TextAppend | TextEnd) -> str:
    """The text frame a client sends for `command` (the CLI's `say`); fields left at
    their defaults are left out, except a text_append's text."""
    kind = {SendMessage: "send_message", TextStart: "text_start", TextAppend: "text_append", TextEnd: "text_end"}
    message: dict[str, Any] = {"type": kind[type(command)]}
    for spec in dataclasses.fields(command):
        value = getattr(command, spec.name)
        if value != spec.default or isinstance(command, TextAppend) and spec.name == "text":
            message[spec.name] = value
    return json.dumps(message)


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
