"""The router's open streaming utterances (DESIGN.md section 10): which connection opened
each one, and the timer that speaks a quiet stream's tail (`stream_idle_flush_s`) and
ends a stream left open (`stream_idle_end_s`).

Only the router calls this; it is the router's state, kept in its own module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog
import trio

from pipeline.config import Settings
from pipeline.streaming import TextStream

log = structlog.get_logger()


@dataclass
class _Open:
    owner: int | None
    stream: TextStream
    timer: trio.CancelScope = field(default_factory=trio.CancelScope)


class OpenStreams:
    """Streams by utterance id, from `text_start` until they end (text_end, an implied
    end, cancel, or their utterance finishing).

    Error handling: `find` answers None for an id that is unknown, ended, or opened by
    another connection: the router then answers `unknown_utterance`.
    """

    def __init__(self, settings: Settings, nursery: trio.Nursery) -> None:
        self.flush_after = settings.stream_idle_flush_s
        self.end_after = settings.stream_idle_end_s
        self._nursery = nursery
        self._open: dict[str, _Open] = {}

    def open(self, utterance_id: str, owner: int | None, stream: TextStream) -> None:
        entry = self._open[utterance_id] = _Open(owner, stream)
        self._nursery.start_soon(self._watch, utterance_id, entry)

    def find(self, utterance_id: str, asker: int | None) -> TextStream | None:
        entry = self._open.get(utterance_id)
        return entry.stream if entry is not None and entry.owner == asker else None

    def end(self, utterance_id: str, *, implied: bool = False) -> None:
        """End the stream (the tail is spoken) and forget it."""
        entry = self._open.pop(utterance_id, None)
        if entry is not None:
            entry.timer.cancel()
            entry.stream.end(implied=implied, now=trio.current_time())

    def end_all(self, owner: int | None = None) -> None:
        """End every stream `owner` opened (its connection has gone), or every stream."""
        for utterance_id, entry in list(self._open.items()):
            if owner is None or entry.owner == owner:
                log.info("utterance.stream_ended", utterance_id=utterance_id, reason="implied")
                self.end(utterance_id, implied=True)

    async def _watch(self, utterance_id: str, entry: _Open) -> None:
        """Flush the tail after `flush_after` s without text; end after `end_after` s."""
        stream = entry.stream
        flushed_for: float | None = None  # the last_text_at whose tail was flushed
        with entry.timer:
            while True:
                quiet_since = stream.last_text_at
                if flushed_for != quiet_since:
                    await trio.sleep_until(quiet_since + self.flush_after)
                    if stream.last_text_at == quiet_since:
                        stream.flush(trio.current_time())
                        flushed_for = quiet_since
                    continue
                await trio.sleep_until(quiet_since + self.end_after)
                if stream.last_text_at == quiet_since:
                    log.info("utterance.stream_ended", utterance_id=utterance_id, reason="idle")
                    self._open.pop(utterance_id, None)
                    stream.end(implied=True, now=trio.current_time())
                    return
