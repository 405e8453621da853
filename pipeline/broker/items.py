"""The items only the broker bridge sends: a command with the daemon and request it came
from (edge → speaker), and the answer to an HTTP request (speaker → the edge that holds
that request). Everything else crossing the broker is a pipeline/flow.py value as is."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from pipeline.commands import Command, TTSProvider
from pipeline.events import ServerEvent


@dataclass(frozen=True)
class RequestKey:
    """An HTTP request waiting for answers on daemon `daemon` (its number `request` there)."""

    daemon: str
    request: int


@dataclass(frozen=True)
class CommandEntry:
    """One Envelope on its way to the speaker: `conn_id` is global (every daemon numbers
    its connections in a range of its own), `answer_to` names the HTTP request waiting."""

    conn_id: int | None
    command: Command
    received_at: float
    answer_to: RequestKey | None = None


@dataclass(frozen=True)
class HttpAnswer:
    """An answer for the HTTP request `to` (only the daemon holding it acts on it)."""

    to: RequestKey
    event: ServerEvent


@dataclass(frozen=True)
class Queued:
    """A whole text the speaker queued: what the next speaker needs to speak it, should
    this one die before it begins. Published before its `accepted`, so a sender that was
    told `accepted` can count on it."""

    utterance_id: str
    text: str
    voice: str | None
    speed: float | None
    provider: TTSProvider | None
    owner: int | None
    received_at: float


_UTTERANCE_NUMBER: Final = re.compile(r"u(\d+)", re.ASCII)


def utterance_number(utterance_id: str) -> int | None:
    """The n of an utterance id `u<n>` (the router's), which a next speaker continues
    after; None for any other id."""
    match = _UTTERANCE_NUMBER.fullmatch(utterance_id)
    return int(match.group(1)) if match else None
