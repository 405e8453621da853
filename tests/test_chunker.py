"""The chunker actor: what goes into its channel and what comes out (no network)."""

from __future__ import annotations

import dataclasses

import trio
from hypothesis import given, settings as hyp_settings
from hypothesis import strategies as st

from actors.chunker import ChunkCounter, Chunker
from pipeline.commands import TTSProvider
from pipeline.config import Settings
from pipeline.flow import Audio, Event, Frame, UtteranceBegin, UtteranceEnd, UtteranceFinished, UtteranceStarted

RATE = 24000
SETTINGS = Settings(sample_rate=RATE, chunk_ms=200, first_chunks_ms=(40, 80, 160))


def begin(uid: str = "u1") -> UtteranceBegin:
    return UtteranceBegin(uid, TTSProvider.PIPER, "joe", owner=1, received_at=0.0)


def run_chunker(items, settings=SETTINGS, counter=None):
    async def main():
        speech_send, speech_recv = trio.open_memory_channel(len(items) + 1)
        out_send, out_recv = trio.open_memory_channel(10_000)
        for item in items:
            speech_send.send_nowait(item)
        speech_send.close()
        await Chunker(settings, speech_recv, out_send, counter).run()
        return [item async for item in out_recv]

    return trio.run(main)


def ms(n: float) -> bytes:
    return b"\x01\x00" * round(n * RATE / 1000)


def test_chunks_grow_then_stay_at_chunk_ms_and_only_the_last_is_final():
    out = run_chunker([begin(), Audio("u1", ms(1000)), UtteranceEnd("u1", "ok")])
    frames = [o for o in out if isinstance(o, Frame)]
    assert [round(len(f.pcm) / 2 / RATE * 1000) for f in frames] == [40, 80, 160, 200, 200, 200, 120]
    assert [f.is_final for f in frames] == [False] * 6 + [True]
    assert [f.chunk_id for f in frames] == list(range(7))
    assert isinstance(out[0], UtteranceStarted) and out[0].payload["first_chunk_id"] == 0
    assert isinstance(out[-1], UtteranceFinished)
    assert out[-1].payload | {"rtf": None} == {
        "type": "utterance_finished", "utterance_id": "u1", "status": "ok", "chunks": 7,
        "last_chunk_id": 6, "audio_ms": 1000, "ttfa_ms": None, "rtf": None,
    }


def test_the_first_chunk_leaves_as_soon_as_there_is_more_than_40_ms():
    out = run_chunker([begin(), Audio("u1", ms(41))])
    assert [len(o.pcm) for o in out if isinstance(o, Frame)] == [len(ms(40))]


def test_audio_ending_on_a_chunk_boundary_still_ends_with_one_final_chunk():
    out = run_chunker([begin(), Audio("u1", ms(40)), Audio("u1", ms(80)), UtteranceEnd("u1", "ok")])
    frames = [o for o in out if isinstance(o, Frame)]
    assert [f.is_final for f in frames] == [False, True] and all(f.pcm for f in frames)


def test_an_utterance_without_audio_is_failed_with_no_chunks():
    out = run_chunker([UtteranceEnd("u1", "ok")])
    assert [o.payload["status"] for o in out] == ["failed"]
    assert out[0].payload["last_chunk_id"] is None and out[0].payload["chunks"] == 0


def test_a_cancelled_utterance_drops_what_is_held_and_has_no_final_chunk():
    out = run_chunker([begin(), Audio("u1", ms(100)), UtteranceEnd("u1", "cancelled")])
    frames = [o for o in out if isinstance(o, Frame)]
    assert frames and not any(f.is_final for f in frames)
    assert out[-1].payload["status"] == "cancelled"
    assert out[-1].payload["audio_ms"] == 40


def test_events_pass_through_in_order():
    note = Event({"type": "accepted", "utterance_id": "u2", "position": 0}, to=3)
    out = run_chunker([begin(), Audio("u1", ms(100)), note, UtteranceEnd("u1", "ok")])
    kinds = [type(o).__name__ for o in out]
    assert kinds == ["UtteranceStarted", "Frame", "Event", "Frame", "UtteranceFinished"]


def test_chunk_ids_wrap_at_two_to_the_32():
    out = run_chunker([begin(), Audio("u1", ms(300)), UtteranceEnd("u1", "ok")], counter=ChunkCounter(2**32 - 2))
    assert [o.chunk_id for o in out if isinstance(o, Frame)] == [2**32 - 2, 2**32 - 1, 0, 1]


@hyp_settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 12000).map(lambda n: b"\x02\x00" * n), min_size=1, max_size=8), st.integers(20, 400))
def test_any_split_of_audio_comes_out_whole_never_empty_one_final(pieces, chunk_ms):
    settings = dataclasses.replace(SETTINGS, chunk_ms=chunk_ms)
    out = run_chunker([begin()] + [Audio("u1", p) for p in pieces] + [UtteranceEnd("u1", "ok")], settings)
    frames = [o for o in out if isinstance(o, Frame)]
    assert b"".join(f.pcm for f in frames) == b"".join(pieces)
    assert all(f.pcm for f in frames)
    assert [f.is_final for f in frames].count(True) == 1 and frames[-1].is_final
