"""The text of one streaming utterance (DESIGN.md section 10) as it arrives: the router
appends to it from its command loop; the speaker reads it piece by piece, waiting for a
piece that is not complete yet.

    text_start/text_append ──► TextStream.append ──► StreamSegmenter ──► pieces ──► speaker
                  text_end ──► TextStream.end (the tail is spoken)

Error handling: appending past `max_chars` in all raises `StreamTooLong` and changes
nothing; appending to an ended stream is the router's to refuse (`unknown_utterance`).
"""

from __future__ import annotations

import trio

from pipeline.stream_text import StreamSegmenter
from pipeline.timing import OffsetFinder


class StreamTooLong(Exception):
    """An append would take the stream past `max_stream_chars`."""


class TextStream:
    """A growing text cut into pieces as soon as each is complete.

    `ended` is set once no more text will come: by `text_end`, or by the stream's end
    being implied (its connection closed, or no text for
    `stream_idle_end_s`): the held tail is then spoken too, and `cut_short` says whether
    there was one, i.e. the reply may have stopped mid-thought (status `partial`).
    """

    def __init__(self, *, short_first: bool, max_chars: int, now: float) -> None:
        self._segmenter = StreamSegmenter(short_first=short_first)
        self.max_chars = max_chars
        self.chars = 0
        self.pieces: list[str] = []
        self.offsets: list[int] = []  # where each piece starts in the whole streamed text
        self._finder = OffsetFinder()
        self.ended = False
        self.cut_short = False
        self.last_text_at = now
        self.first_piece_at: float | None = None  # when the text completing piece 1 arrived
        self._changed = trio.Event()

    def append(self, text: str, *, flush: bool = False, now: float) -> None:
        """Add `text`; release every piece now complete (with `flush`, the tail too)."""
        if self.chars + len(text) > self.max_chars:
            raise StreamTooLong(
                f"the streamed text would pass {self.max_chars} characters (max_stream_chars); "
                "this part was refused and the utterance goes on"
            )
        self.chars += len(text)
        self._finder.add(text)
        self.last_text_at = now
        self._release(self._segmenter.append(text), now)
        if flush:
            self.flush(now)

    def flush(self, now: float) -> None:
        """Speak the held tail as it is (an idle flush)."""
        self._release(self._segmenter.flush(), now)

    def end(self, *, implied: bool = False, now: float) -> None:
        """No more text: the tail is spoken. `implied`: the client did not say so (its
        connection closed, or it went quiet)."""
        if self.ended:
            return
        tail = self._segmenter.flush()
        if implied and any(piece.strip() for piece in tail):
            self.cut_short = True
        self._release(tail, now)
        self.ended = True
        self._wake()

    async def get(self, index: int) -> str | None:
        """Piece `index` (stripped), waiting until it is complete; None past the last."""
        while index >= len(self.pieces) and not self.ended:
            await self._changed.wait()
        return self.pieces[index] if index < len(self.pieces) else None

    def offset(self, index: int) -> int:
        """Where piece `index` (one already got) starts in the text streamed so far."""
        return self.offsets[index]

    async def peek(self, index: int) -> str | None:
        """Piece `index` if it is complete already, else None (lookahead never waits)."""
        return self.pieces[index] if index < len(self.pieces) else None

    def _release(self, pieces: list[str], now: float) -> None:
        released = [piece.strip() for piece in pieces if piece.strip()]
        if released:
            if self.first_piece_at is None:
                self.first_piece_at = now
            self.pieces += released
            self.offsets += [self._finder.locate(piece) for piece in released]
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
