"""The server's events as typed domain values: what the actors put on their channels.

Each wire event of DESIGN.md section 4 is one frozen dataclass here; `pipeline.protocol.
render` is the only place that turns them into JSON. Routing (who receives an event) is
not part of the event: see `pipeline.flow.Reply` and `pipeline.flow.Broadcast`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pipeline.session import SessionState


class ErrorCode(enum.StrEnum):
    """Every `error.code` a client can receive."""

    INVALID_JSON = "invalid_json"
    INVALID_COMMAND = "invalid_command"
    EMPTY_TEXT = "empty_text"
    TEXT_TOO_LONG = "text_too_long"
    UNKNOWN_PROVIDER = "unknown_provider"
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    PROVIDER_FAILED = "provider_failed"
    QUEUE_FULL = "queue_full"
    NOT_INITIALIZED = "not_initialized"
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    BINARY_NOT_ACCEPTED = "binary_not_accepted"
    UNKNOWN_UTTERANCE = "unknown_utterance"


class Status(enum.StrEnum):
    """How an utterance ended (DESIGN.md section 5)."""

    OK = "ok"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELLED = "cancelled"


class AudioFormat(enum.StrEnum):
    """The payload of a subscriber's VOICE_DATA frames (`format=` on its connection)."""

    WAV = "wav"
    PCM = "pcm"
    OPUS = "opus"  # 20 ms Opus packets, each `u16 LE length` + bytes (DESIGN.md section 12)


@dataclass(frozen=True)
class Hello:
    session: SessionState
    provider: str


@dataclass(frozen=True)
class Ready:
    provider: str


@dataclass(frozen=True)
class Accepted:
    utterance_id: str
    position: int
    streaming: bool = False  # rendered only when True (a text_start's answer)


@dataclass(frozen=True)
class UtteranceStarted:
    """Rendered per subscriber: `format` is each receiver's own. `codec` and `pre_skip`
    (samples at 48 kHz a decoder drops first, RFC 7845) are set for opus subscribers only."""

    utterance_id: str
    provider: str
    voice: str
    sample_rate: int
    first_chunk_id: int
    codec: str | None = None
    pre_skip: int | None = None


@dataclass(frozen=True)
class UtteranceFinished:
    utterance_id: str
    status: Status
    chunks: int
    last_chunk_id: int | None
    audio_ms: int
    ttfa_ms: float | None
    rtf: float | None


@dataclass(frozen=True)
class WordTime:
    word: str
    start_ms: int  # from the utterance's first audio sample
    end_ms: int
    offset: int  # in the utterance's text, Unicode code points


@dataclass(frozen=True)
class Words:
    """The words that begin in the next audio chunk (DESIGN.md section 11)."""

    utterance_id: str
    words: tuple[WordTime, ...]
    estimated: bool


@dataclass(frozen=True)
class VisemeTime:
    viseme: str  # one of pipeline.visemes.VISEMES
    start_ms: int
    end_ms: int


@dataclass(frozen=True)
class Visemes:
    """The visemes that begin in the next audio chunk, contiguous over the utterance."""

    utterance_id: str
    visemes: tuple[VisemeTime, ...]
    estimated: bool


@dataclass(frozen=True)
class ProviderChanged:
    provider: str


@dataclass(frozen=True)
class ErrorEvent:
    code: ErrorCode
    message: str
    utterance_id: str | None = None
    recovered: bool | None = None
    retry_after: float | None = None  # rate_limited: seconds until a command would pass


@dataclass(frozen=True)
class Cancelled:
    utterance_ids: tuple[str, ...]


@dataclass(frozen=True)
class Closed:
    pass


ServerEvent = (
    Hello | Ready | Accepted | UtteranceStarted | UtteranceFinished | ProviderChanged | ErrorEvent | Cancelled | Closed
    | Words | Visemes
)
