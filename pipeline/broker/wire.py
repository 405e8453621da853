"""The one codec for every item that crosses the broker: pipeline values (pipeline/flow.py
items, commands, events) to Redis stream fields and back.

An entry is `{b"item": JSON, b"0": bytes, b"1": bytes, ...}`. The JSON tags each dataclass
with its class name and each enum member with its enum's; every bytes value (audio) moves
to a field of its own, so audio crosses as raw bytes, never base64. A field named in
CLOCK_FIELDS is a reading of the trio clock, which means nothing in another process: it
crosses as wall-clock time and is turned back into the receiver's trio clock.

Shipping a new item kind is one line: add its class (and any dataclass or enum it carries)
to KINDS. Only classes listed there are ever built from an entry, so a broker entry can
never make this process run anything else.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time
from collections.abc import Mapping
from typing import Any, Final

import trio

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
    return cls(**{k: _value(v, fields) for k, v in plain["f"].items()})
