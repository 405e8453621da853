"""PCM reassembly and resampling: properties that must hold for every split."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pipeline.audio import Resampler, SampleAligner


@given(st.binary(max_size=3000).map(lambda b: b[: len(b) // 2 * 2]), st.lists(st.integers(0, 3000), max_size=12))
def test_any_split_of_a_byte_stream_reassembles_to_whole_samples(pcm, cuts):
    aligner = SampleAligner()
    points = sorted({min(c, len(pcm)) for c in cuts} | {0, len(pcm)})
    out = b""
    for start, end in zip(points, points[1:]):
        piece = aligner.feed(pcm[start:end])
        assert len(piece) % 2 == 0
        out += piece
    assert out == pcm and aligner.leftover == 0


@given(st.lists(st.integers(1, 5000), min_size=1, max_size=6))
def test_streaming_resampling_gives_the_length_of_one_pass(sizes):
    signal = (np.sin(np.arange(sum(sizes)) / 7) * 8000).astype("<i2").tobytes()
    resampler = Resampler(22050, 24000)
    out, offset = b"", 0
    for size in sizes:
        out += resampler.feed(signal[offset * 2 : (offset + size) * 2])
        offset += size
    out += resampler.flush()
    expected = sum(sizes) * 24000 / 22050
    assert abs(len(out) / 2 - expected) <= 2


def test_equal_rates_pass_audio_through_untouched():
    resampler = Resampler(24000, 24000)
    assert resampler.feed(b"\x01\x02\x03\x04") == b"\x01\x02\x03\x04" and resampler.flush() == b""
