"""The chunker actor: what goes into its channel and what comes out (no network)."""

from __future__ import annotations

import dataclasses

import trio
from hypothesis import given, settings as hyp_settings
from hypothesis import strategies as st

from actors.chunker import ChunkCounter, Chunker
from pipeline.commands import TTSProvider
from pipeline.config import Settings
from pipeline.events import Accepted, Status, UtteranceFinished
from pipeline.flow import Audio, FinishNotice, Frame, Reply, StartNotice, UtteranceBegin, UtteranceEnd

RATE = 24000
SETTINGS = Settings(sample_rate=RATE, chunk_ms=200, first_chunks_ms=(40, 80, 160))


def begin(uid: str = "u1") -> UtteranceBegin:
    return UtteranceBegin(uid, TTSProvider.PIPER, "joe", owner=1, received_at=0.0)


def end(status: Status = Status.OK, uid: str = "u1") -> UtteranceEnd:
    return UtteranceEnd(uid, 1, status, TTSProvider.PIPER)


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
    out = run_chunker([begin(), Audio("u1", ms(1000)), end()])
    frames = [o for o in out if isinstance(o, Frame)]
    assert [round(len(f.pcm) / 2 / RATE * 1000) for f in frames] == [40, 80, 160, 200, 200, 200, 120]
    assert [f.is_final for f in frames] == [False] * 6 + [True]
    assert [f.chunk_id for f in frames] == list(range(7))
    assert isinstance(out[0], StartNotice) and out[0].event.first_chunk_id == 0 and out[0].owner == 1
    assert isinstance(out[-1], FinishNotice) and out[-1].owner == 1 and out[-1].provider == "piper"
    assert dataclasses.replace(out[-1].event, rtf=None) == UtteranceFinished(
        "u1", Status.OK, chunks=7, last_chunk_id=6, audio_ms=1000, ttfa_ms=None, rtf=None
    )


def test_the_first_chunk_leaves_as_soon_as_there_is_more_than_40_ms():
    out = run_chunker([begin(), Audio("u1", ms(41))])
    assert [len(o.pcm) for o in out if isinstance(o, Frame)] == [len(ms(40))]


def test_audio_ending_on_a_chunk_boundary_still_ends_with_one_final_chunk():
    out = run_chunker([begin(), Audio("u1", ms(40)), Audio("u1", ms(80)), end()])
    frames = [o for o in out if isinstance(o, Frame)]
    assert [f.is_final for f in frames] == [False, True] and all(f.pcm for f in frames)


def test_an_utterance_without_audio_is_failed_with_no_chunks():
    out = run_chunker([end()])
    assert [o.event.status for o in out] == [Status.FAILED]
    assert out[0].event.last_chunk_id is None and out[0].event.chunks == 0


def test_a_cancelled_utterance_drops_what_is_held_and_has_no_final_chunk():
    out = run_chunker([begin(), Audio("u1", ms(100)), end(Status.CANCELLED)])
    frames = [o for o in out if isinstance(o, Frame)]
    assert frames and not any(f.is_final for f in frames)
    assert out[-1].event.status is Status.CANCELLED
    assert out[-1].event.audio_ms == 40


def test_events_pass_through_in_order():
    note = Reply(3, Accepted("u2", 0))
    out = run_chunker([begin(), Audio("u1", ms(100)), note, end()])
    kinds = [type(o).__name__ for o in out]
    assert kinds == ["StartNotice", "Frame", "Reply", "Frame", "FinishNotice"]


def test_chunk_ids_wrap_at_two_to_the_32():
    out = run_chunker([begin(), Audio("u1", ms(300)), end()], counter=ChunkCounter(2**32 - 2))
    assert [o.chunk_id for o in out if isinstance(o, Frame)] == [2**32 - 2, 2**32 - 1, 0, 1]


@hyp_settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 12000).map(lambda n: b"\x02\x00" * n), min_size=1, max_size=8), st.integers(20, 400))
def test_any_split_of_audio_comes_out_whole_never_empty_one_final(pieces, chunk_ms):
    settings = dataclasses.replace(SETTINGS, chunk_ms=chunk_ms)
    out = run_chunker([begin()] + [Audio("u1", p) for p in pieces] + [end()], settings)
    frames = [o for o in out if isinstance(o, Frame)]
    assert b"".join(f.pcm for f in frames) == b"".join(pieces)
    assert all(f.pcm for f in frames)
    assert [f.is_final for f in frames].count(True) == 1 and frames[-1].is_final
