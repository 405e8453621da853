"""The delivery promises the soak run holds the daemon to, checked on what one healthy
subscriber receives (DESIGN section 4):

- chunk ids go up by exactly 1 (wrapping at 2^32) across the whole run, no gap;
- every chunk lies between the `utterance_started` of its utterance and that utterance's
  `utterance_finished`; the first is `first_chunk_id`; `finished.chunks` and
  `finished.last_chunk_id` match what arrived;
- no empty chunk; WAV chunks carry exact sizes;
- at most one isFinal chunk per utterance and it is the last; an utterance that produced
  audio and was not cancelled has one;
- exactly one `utterance_finished` per utterance, with a known status.

A broken promise is a `Violation` in the shared `Violations` (counted, the first few
described); a chunk that should have arrived and did not also counts in `lost`.
"""

from __future__ import annotations

import collections
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

ID_SPACE = 2**32
FRAME_HEADER = struct.Struct("<IIB")  # type, chunkId, isFinal
VOICE_DATA = 2
WAV_HEADER_BYTES = 44
STATUSES = frozenset({"ok", "partial", "failed", "cancelled"})
# Descriptions kept for the report; the count is always exact.
DESCRIBED = 20


@dataclass
class Violations:
    """Every broken promise of the run, from every checker."""

    count: int = 0
    by_kind: collections.Counter[str] = field(default_factory=collections.Counter)
    first: list[str] = field(default_factory=list)

    def add(self, kind: str, detail: str) -> None:
        self.count += 1
        self.by_kind[kind] += 1
        if len(self.first) < DESCRIBED:
            self.first.append(f"{kind}: {detail}")


def decode_frame(data: bytes, fmt: str) -> tuple[int, int, bool, int]:
    """(message type, chunk id, isFinal, audio bytes) of one VOICE_DATA frame as sent.

    Error handling: ValueError for a frame that cannot be read (bad zlib, short header,
    a WAV whose sizes are not exact).
    """
    if data[:1] == b"\x78":  # zlib header: a compressed frame (raw frames start with 0x02)
        data = zlib.decompress(data)
    if len(data) < FRAME_HEADER.size:
        raise ValueError(f"frame of {len(data)} bytes")
    kind, chunk_id, final = FRAME_HEADER.unpack_from(data)
    audio = data[FRAME_HEADER.size:]
    if fmt == "wav":
        if audio[:4] != b"RIFF" or len(audio) < WAV_HEADER_BYTES:
            raise ValueError("chunk is not a WAV file")
        riff_size, data_size = struct.unpack_from("<I", audio, 4)[0], struct.unpack_from("<I", audio, 40)[0]
        if riff_size != len(audio) - 8 or data_size != len(audio) - WAV_HEADER_BYTES:
            raise ValueError(f"WAV sizes {riff_size}/{data_size} for {len(audio)} bytes")
        return kind, chunk_id, bool(final), data_size
    return kind, chunk_id, bool(final), len(audio)


class StreamChecker:
    """Follows one healthy subscriber's stream and reports broken promises."""

    def __init__(self, name: str, fmt: str, violations: Violations) -> None:
        self.name = name
        self.fmt = fmt
        self.violations = violations
        self.chunks = 0
        self.lost = 0
        self.last_id: int | None = None
        self.finished: collections.Counter[str] = collections.Counter()
        self.statuses: collections.Counter[str] = collections.Counter()
        self._started: set[str] = set()
        self._current: str | None = None
        self._first_id: int | None = None
        self._seen = 0  # chunks of the current utterance
        self._last_of_current: int | None = None
        self._final_seen = False

    def _bad(self, kind: str, detail: str) -> None:
        self.violations.add(kind, f"{self.name}: {detail}")

    def frame(self, data: bytes) -> None:
        try:
            kind, chunk_id, final, audio = decode_frame(data, self.fmt)
        except (ValueError, zlib.error) as e:
            return self._bad("bad_frame", str(e))
        if kind != VOICE_DATA:
            return self._bad("bad_frame", f"message type {kind}")
        self.chunks += 1
        if self.last_id is not None and chunk_id != (expected := (self.last_id + 1) % ID_SPACE):
            gap = (chunk_id - expected) % ID_SPACE
            self._bad("chunk_id_gap", f"chunk {chunk_id} after {self.last_id}")
            if gap < ID_SPACE // 2:  # ids that went forward: those in between were lost
                self.lost += gap
        self.last_id = chunk_id
        if audio <= 0:
            self._bad("empty_chunk", f"chunk {chunk_id}")
        if self._current is None:
            return self._bad("chunk_outside_utterance", f"chunk {chunk_id}")
        if self._seen == 0 and self._first_id is not None and chunk_id != self._first_id:
            self._bad("first_chunk_id", f"{self._current}: first chunk {chunk_id}, announced {self._first_id}")
        if self._final_seen:
            self._bad("chunk_after_final", f"{self._current}: chunk {chunk_id}")
        self._seen += 1
        self._last_of_current = chunk_id
        self._final_seen = self._final_seen or final

    def event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "utterance_started":
            utt = str(event.get("utterance_id"))
            if self._current is not None:
                self._bad("started_inside_utterance", f"{utt} started while {self._current} had not finished")
            if utt in self._started:
                self._bad("started_twice", utt)
            self._started.add(utt)
            self._current, self._first_id = utt, event.get("first_chunk_id")
            self._seen, self._last_of_current, self._final_seen = 0, None, False
        elif kind == "utterance_finished":
            self._finished(event)

    def _finished(self, event: dict[str, Any]) -> None:
        utt, status, chunks = str(event.get("utterance_id")), event.get("status"), event.get("chunks")
        self.finished[utt] += 1
        self.statuses[str(status)] += 1
        if self.finished[utt] > 1:
            self._bad("finished_twice", utt)
        if status not in STATUSES:
            self._bad("unknown_status", f"{utt}: {status!r}")
        if utt == self._current:
            if chunks != self._seen:
                self._bad("chunk_count", f"{utt}: finished says {chunks} chunks, {self._seen} arrived")
                if isinstance(chunks, int) and chunks > self._seen:
                    self.lost += chunks - self._seen
            if event.get("last_chunk_id") != self._last_of_current:
                self._bad("last_chunk_id", f"{utt}: finished says {event.get('last_chunk_id')}, "
                                           f"last arrived {self._last_of_current}")
            if status in ("ok", "partial") and self._seen and not self._final_seen:
                self._bad("no_final_chunk", f"{utt} ended {status} without an isFinal chunk")
            self._current = None
        elif utt in self._started and self.finished[utt] == 1:
            self._bad("finished_out_of_order", f"{utt} finished while {self._current} was speaking")
        elif chunks:
            self._bad("chunks_without_start", f"{utt}: finished with {chunks} chunks, never started")
            if isinstance(chunks, int):
                self.lost += chunks
