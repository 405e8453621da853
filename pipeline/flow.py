"""The values that travel on the channels between the four actors.

    intake ──Envelope──► router ──Speech──► chunker ──Outgoing──► broadcaster
       └──────────────── Join / Leave / Reply (answers to one connection) ──────┘
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import trio
from trio_websocket import CloseReason

from pipeline.commands import Command, TTSProvider
from pipeline.events import ServerEvent, Status, UtteranceFinished, UtteranceStarted, Visemes, Words
from pipeline.session import SessionState
from pipeline.timing import Timing


@dataclass(frozen=True)
class SubscriberOptions:
    """What a connection asked for in its query string."""

    format: str = "wav"  # wav | pcm | opus
    compress: bool = False
    subscribe: bool = True
    timing: str = ""  # "" | words | visemes | all (DESIGN.md section 11)
    token: str | None = field(default=None, repr=False)  # a secret: never in a repr or log


@dataclass(frozen=True)
class Envelope:
    """A command, stamped with the time it arrived (trio clock), and where its one answer
    goes: to WebSocket connection `conn_id` (through the broadcaster), or into `answer`
    (an HTTP request waiting for it; `conn_id` is then None)."""

    conn_id: int | None
    command: Command
    received_at: float
    answer: trio.MemorySendChannel[ServerEvent] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Reply:
    """An event for one connection only (the answer to its command)."""

    to: int
    event: ServerEvent


@dataclass(frozen=True)
class Broadcast:
    """An event for every subscriber; `also_to` (the connection that asked, or the owner
    of the utterance the event is about) gets it even when it does not subscribe."""

    event: ServerEvent
    also_to: int | None = None


@dataclass(frozen=True)
class SessionStatus:
    """The session as the router published it last: what hello, /v1/info and /readyz say."""

    state: SessionState
    provider: TTSProvider


# ---- router → chunker


@dataclass(frozen=True)
class UtteranceBegin:
    utterance_id: str
    provider: TTSProvider
    voice: str
    owner: int | None  # the WebSocket connection that submitted it (None: over HTTP)
    received_at: float


@dataclass(frozen=True)
class Audio:
    """PCM s16le mono at the daemon's output rate, whole samples."""

    utterance_id: str
    pcm: bytes


@dataclass(frozen=True)
class UtteranceEnd:
    utterance_id: str
    owner: int | None  # the WebSocket connection that submitted it (None: over HTTP)
    status: Status
    provider: TTSProvider  # the one chosen (the chunker knows which one was heard)
    synth_seconds: float = 0.0


# ---- chunker → broadcaster


@dataclass(frozen=True)
class Frame:
    """One audio chunk; encoded to bytes once per (format, compress) variant. `encoded`:
    those variants made already (by the speaker, when the frame came through the broker:
    every daemon then sends the same bytes)."""

    utterance_id: str
    chunk_id: int
    is_final: bool
    pcm: bytes
    encoded: Mapping[tuple[str, bool], bytes] | None = None


@dataclass(frozen=True)
class StartNotice:
    """Sent just before the utterance's first frame: the broadcaster announces it (in each
    subscriber's format) and times the first audio from `received_at`."""

    event: UtteranceStarted
    owner: int | None  # the WebSocket connection that submitted it (None: over HTTP)
    received_at: float


@dataclass(frozen=True)
class TimingNotice:
    """Words or visemes that begin in the next frame: only for subscribers whose
    `timing` option asked for that kind."""

    event: Words | Visemes


@dataclass(frozen=True)
class FinishNotice:
    """The utterance's end: the broadcaster adds `ttfa_ms`, logs and counts it, and
    announces it. `provider`: the one heard first (or the chosen one, if none was)."""

    event: UtteranceFinished
    owner: int | None  # the WebSocket connection that submitted it (None: over HTTP)
    provider: str


# ---- intake → broadcaster


@dataclass(frozen=True)
class Join:
    conn_id: int
    connection: Outlet
    options: SubscriberOptions
    stream: FastPath | None = None  # the connection's socket, for frames written without awaiting


class Outlet(Protocol):
    """What the broadcaster needs of a client connection (trio-websocket's
    WebSocketConnection is one): write a message, close it, say whether it is closed."""

    @property
    def closed(self) -> CloseReason | None: ...

    async def send_message(self, message: str | bytes) -> None: ...

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None: ...


class FastPath(Protocol):
    """The socket under a connection, written without awaiting when it has room
    (actors/subscriber_stream.SubscriberStream)."""

    def write_nowait(self, data: bytes) -> int | None: ...

    async def flush(self) -> None: ...


@dataclass(frozen=True)
class Leave:
    conn_id: int
    reason: str


# ---- daemon → router → chunker → broadcaster


@dataclass(frozen=True, eq=False)
class Shutdown:
    """The daemon is draining (SIGTERM/SIGINT): not a client command. The router cancels
    what waits, gives the speaking utterance `grace` seconds, sets `spoken` and passes
    this on; the broadcaster delivers what each subscriber has queued, closes it with
    1001 and sets `closed` once every connection has left."""

    grace: float
    spoken: trio.Event = field(default_factory=trio.Event)
    closed: trio.Event = field(default_factory=trio.Event)


Notice = Reply | Broadcast | SessionStatus
Speech = UtteranceBegin | Audio | Timing | UtteranceEnd | Notice | Shutdown
Outgoing = Frame | StartNotice | FinishNotice | TimingNotice | Notice | Join | Leave | Shutdown
