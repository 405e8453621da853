"""The session commands, mirroring the seed's enum, as immutable typed values.

Intake turns client JSON into these; the router acts on them. Every command is a
frozen dataclass, so a command can be passed between tasks without copying.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class TTSProvider(str, enum.Enum):
    """The speech providers the daemon knows by name."""

    PIPER = "piper"
    KOKOROS = "kokoros"
    OPENAI = "openai"


@dataclass(frozen=True)
class Initialize:
    """(Re)open the session: load and check the current provider, then broadcast `ready`."""


@dataclass(frozen=True)
class SendMessage:
    """Queue one utterance; `provider` is a one-off choice for this utterance only."""

    text: str
    voice: str | None = None
    speed: float | None = None
    provider: TTSProvider | None = None


@dataclass(frozen=True)
class SetTTSProvider:
    """Switch the provider for the next utterance."""

    provider: TTSProvider


@dataclass(frozen=True)
class Close:
    """Stop accepting, finish the queue, release the provider, broadcast `closed`."""


@dataclass(frozen=True)
class Cancel:
    """Stop the speaking utterance; with `all`, drop the queued ones too (extension)."""

    all: bool = False


@dataclass(frozen=True)
class TextStart:
    """Open a streaming utterance (DESIGN.md section 10); `text` is its optional first text."""

    voice: str | None = None
    speed: float | None = None
    provider: TTSProvider | None = None
    text: str = ""


@dataclass(frozen=True)
class TextAppend:
    """More text for an open streaming utterance; `flush` speaks the held tail now."""

    utterance_id: str
    text: str
    flush: bool = False


@dataclass(frozen=True)
class TextEnd:
    """The streaming utterance's text is complete (`text`: its optional last part)."""

    utterance_id: str
    text: str = ""


@dataclass(frozen=True)
class Disconnected:
    """Not a client command: intake tells the router that a connection has gone, so the
    streaming utterances it opened end by themselves."""


Command = Initialize | SendMessage | SetTTSProvider | Close | Cancel | TextStart | TextAppend | TextEnd | Disconnected
