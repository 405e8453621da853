"""The values that travel on the channels between the four actors.

    intake ──Envelope──► router ──Speech──► chunker ──Outgoing──► broadcaster
       └──────────────── Join / Leave / Event (replies to one connection) ──────┘
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.commands import Command, TTSProvider


@dataclass(frozen=True)
class SubscriberOptions:
    """What a connection asked for in its query string."""

    format: str = "wav"  # wav | pcm
    compress: bool = False
    subscribe: bool = True
    token: str | None = field(default=None, repr=False)  # a secret: never in a repr or log


@dataclass(frozen=True)
class Envelope:
    """A command from one connection, stamped with the time it arrived (trio clock)."""

    conn_id: int
    command: Command
    received_at: float


@dataclass(frozen=True)
class Event:
    """A JSON event. `to`: only that connection. Otherwise a broadcast; `reply_to` is the
    connection that asked, which gets a copy even when it does not subscribe; events with
    an `utterance_id` also reach the control-only connection that submitted it."""

    payload: dict[str, Any]
    to: int | None = None
    reply_to: int | None = None
    utterance_id: str | None = None


# ---- router → chunker


@dataclass(frozen=True)
class UtteranceBegin:
    utterance_id: str
    provider: TTSProvider
    voice: str
    owner: int
    received_at: float


@dataclass(frozen=True)
class Audio:
    """PCM s16le mono at the daemon's output rate, whole samples."""

    utterance_id: str
    pcm: bytes


@dataclass(frozen=True)
class UtteranceEnd:
    utterance_id: str
    status: str  # ok · partial · failed · cancelled
    synth_seconds: float = 0.0
    provider: str | None = None


# ---- chunker → broadcaster


@dataclass(frozen=True)
class Frame:
    """One audio chunk; encoded to bytes once per (format, compress) variant."""

    utterance_id: str
    chunk_id: int
    is_final: bool
    pcm: bytes
    variants: dict[tuple[str, bool], bytes] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class UtteranceStarted:
    """Sent just before the first frame; the broadcaster fills in each subscriber's format."""

    payload: dict[str, Any]
    received_at: float


@dataclass(frozen=True)
class UtteranceFinished:
    """The broadcaster fills in `ttfa_ms` and logs `utterance.finished`."""

    payload: dict[str, Any]
    rtf: float | None
    provider: str | None


# ---- intake → broadcaster


@dataclass(frozen=True)
class Join:
    conn_id: int
    connection: Any  # trio_websocket.WebSocketConnection
    options: SubscriberOptions
    stream: Any = None  # its actors.subscriber_stream.SubscriberStream, for the fast path


@dataclass(frozen=True)
class Leave:
    conn_id: int
    reason: str


# ---- daemon → router → chunker → broadcaster


@dataclass(frozen=True, eq=False)
class Shutdown:
    """The daemon is stopping (SIGTERM/SIGINT): not a client command. The router cancels
    what waits, gives the speaking utterance `grace` seconds, then passes this on; the
    broadcaster delivers what each subscriber has queued, closes it with 1001 and sets
    `done` once every connection has left."""

    grace: float
    done: Any  # trio.Event, set by the broadcaster


Speech = UtteranceBegin | Audio | UtteranceEnd | Event | Shutdown
Outgoing = Frame | UtteranceStarted | UtteranceFinished | Event | Join | Leave | Shutdown
