"""The one codec for every item that crosses the broker: pipeline values (pipeline/flow.py
items, commands, events) to Redis stream fields and back.

An entry is `{b"item": JSON, b"0": bytes, b"1": bytes, ...}`. The JSON tags each dataclass
with its class name and each enum member with its enum's; every bytes value (audio) moves
to a field of its own, so audio crosses as raw bytes, never base64. A field named in
CLOCK_FIELDS is a reading of the trio clock, which means nothing in another process: it
crosses as wall-clock time and is turned back into the receiver's trio clock.

Shipping a new item kind is one line: add its class (and any dataclass or enum it carries)
to KINDS. Only classes listed there are ever built from an entry, and only from values of
the types their fields declare (typeguard checks each one), so a broker entry written by
anything else can never make this process run other code or hand a reader a string where
it counts on a number.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import time
import typing
from collections.abc import Mapping
from typing import Any, Final

import trio
import typeguard

from pipeline import commands, events, flow
from pipeline.broker import items
from pipeline.session import SessionState

KINDS: Final[tuple[type, ...]] = (
    # commands (edge → speaker)
    items.CommandEntry,
    items.RequestKey,
    commands.Initialize,
    commands.SendMessage,
    commands.SetTTSProvider,
    commands.Close,
    commands.Cancel,
    commands.TextStart,
    commands.TextAppend,
    commands.TextEnd,
    commands.Disconnected,
    commands.TTSProvider,
    # what the speaker sends every daemon's broadcaster
    flow.Frame,
    flow.StartNotice,
    flow.TimingNotice,
    flow.FinishNotice,
    flow.Reply,
    flow.Broadcast,
    flow.SessionStatus,
    items.HttpAnswer,
    items.Queued,
    # the events those carry
    events.Hello,
    events.Ready,
    events.Accepted,
    events.UtteranceStarted,
    events.UtteranceFinished,
    events.Words,
    events.WordTime,
    events.Visemes,
    events.VisemeTime,
    events.ProviderChanged,
    events.ErrorEvent,
    events.Cancelled,
    events.Closed,
    events.ErrorCode,
    events.Status,
    SessionState,
)
CLASSES: Final = {cls.__name__: cls for cls in KINDS}
# Fields holding trio.current_time() readings (see the module docstring).
CLOCK_FIELDS: Final = frozenset({"received_at"})
ITEM_FIELD: Final = b"item"


class WireError(ValueError):
    """An entry this codec cannot read (a kind it does not know, or a broken entry)."""


def encode(item: object) -> dict[bytes, bytes]:
    """The stream fields of `item` (a dataclass whose class is in KINDS)."""
    blobs: list[bytes] = []
    fields = {ITEM_FIELD: json.dumps(_plain(item, blobs), separators=(",", ":")).encode()}
    fields.update((str(i).encode(), blob) for i, blob in enumerate(blobs))
    return fields


def decode(fields: Mapping[bytes, bytes]) -> object:
    """The item an entry holds. Error handling: WireError for anything else."""
    try:
        return _value(json.loads(fields[ITEM_FIELD]), fields)
    except WireError:
        raise
    except (KeyError, TypeError, ValueError, RecursionError) as e:  # (too deep: RecursionError)
        raise WireError(f"unreadable broker entry ({type(e).__name__}: {str(e)[:200]})") from None


def _plain(value: Any, blobs: list[bytes]) -> Any:
    if isinstance(value, enum.Enum):
        return {"$e": _known(type(value)), "v": value.value}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray)):
        blobs.append(bytes(value))
        return {"$b": len(blobs) - 1}
    if isinstance(value, (tuple, list)):
        return {"$t": [_plain(v, blobs) for v in value]}
    if isinstance(value, Mapping):
        return {"$m": [[_plain(k, blobs), _plain(v, blobs)] for k, v in value.items()]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for field in dataclasses.fields(value):
            v = getattr(value, field.name)
            if field.name in CLOCK_FIELDS and isinstance(v, float):
                out[field.name] = {"$w": time.time() - (trio.current_time() - v)}
            else:
                out[field.name] = _plain(v, blobs)
        return {"$c": _known(type(value)), "f": out}
    raise WireError(f"{type(value).__name__} cannot cross the broker; add it to pipeline/broker/wire.py KINDS")


def _known(cls: type) -> str:
    if CLASSES.get(cls.__name__) is not cls:
        raise WireError(f"{cls.__name__} cannot cross the broker; add it to pipeline/broker/wire.py KINDS")
    return cls.__name__


def _value(plain: Any, fields: Mapping[bytes, bytes]) -> Any:
    if not isinstance(plain, dict):
        return plain
    if "$b" in plain:
        return fields[str(plain["$b"]).encode()]
    if "$t" in plain:
        return tuple(_value(v, fields) for v in plain["$t"])
    if "$m" in plain:
        return {_value(k, fields): _value(v, fields) for k, v in plain["$m"]}
    if "$w" in plain:
        # Wall-clock back to this process's trio clock.
        return trio.current_time() - (time.time() - float(plain["$w"]))
    name = plain.get("$c", plain.get("$e"))
    cls = CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise WireError(f"unknown kind {name!r} in a broker entry")
    if "$e" in plain:
        return cls(plain["v"])
    values = {k: _value(v, fields) for k, v in plain["f"].items()}
    hints = _field_types(cls)
    for name, value in values.items():
        if name not in hints:
            raise WireError(f"{name!r} is not a field of {cls.__name__}")
        try:
            typeguard.check_type(value, hints[name])
        except typeguard.TypeCheckError as e:
            raise WireError(f"{cls.__name__}.{name}: {e}"[:300]) from None
    return cls(**values)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """The declared type of each field of the dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def state_change(item: object) -> list[bytes | str]:
    """What publishing `item` changes in the state hash (HSET arguments; read_state reads it)."""
    match item:
        case flow.Frame(chunk_id=chunk_id):
            return ["chunk", str(chunk_id)]
        case flow.Reply(event=events.Accepted(utterance_id=utt_id)) | items.HttpAnswer(event=events.Accepted(utterance_id=utt_id)):
            number = items.utterance_number(utt_id)
            return [] if number is None else ["utterance", str(number)]
        case flow.SessionStatus(state=state, provider=provider):
            return ["session", state.value, "provider", provider.value]
    return []


@dataclasses.dataclass(frozen=True)
class SpeakerState:
    """The broker's state hash as the last speaker left it: the command stream's cursor,
    the last chunk id and utterance number, and the session. A missing or broken value is
    None (the reader falls back on what it has seen), never an exception."""

    cursor: bytes = b"0-0"
    chunk: int | None = None
    utterance: int | None = None
    status: flow.SessionStatus | None = None


def read_state(state: Mapping[bytes, bytes]) -> SpeakerState:
    """Read the state hash (HGETALL). Error handling: a value that does not parse is None."""

    def number(key: bytes) -> int | None:
        text = state.get(key, b"")
        return int(text) if text.isdigit() else None

    status = None
    try:
        status = flow.SessionStatus(SessionState(state[b"session"].decode()), commands.TTSProvider(state[b"provider"].decode()))
    except (KeyError, ValueError):
        pass
    return SpeakerState(state.get(b"cursor", b"0-0"), number(b"chunk"), number(b"utterance"), status)
