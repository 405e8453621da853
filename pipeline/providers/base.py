"""The interface every TTS provider implements; the router only talks to this.

A provider turns one piece of text into PCM s16le mono bytes at its own `sample_rate`.
The bytes may arrive in any split, even between the two bytes of a sample: the router
reassembles and resamples them.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from pipeline.commands import TTSProvider


class Provider(abc.ABC):
    """One speech provider.

    Resource handling: `open` acquires what synthesis needs (a loaded voice, an HTTP
    client) and is idempotent; `aclose` releases it; `synthesize` opens it when needed.

    Error handling: every failure is raised as a `pipeline.errors.ProviderError`
    subclass whose message is safe to show to clients (no secrets).
    """

    name: TTSProvider
    sample_rate: int
    default_voice: str
    # The speaking speed when the client asks for none (a setting of each provider).
    default_speed: float = 1.0
    # How many pieces may be synthesized at once for one utterance (lookahead).
    max_parallel: int = 1
    # The voices it can speak, when it knows them (the embedded voice does); None: the
    # server decides, and an unknown voice fails there.
    known_voices: frozenset[str] | None = None

    def unknown_voice_reason(self, voice: str | None) -> str | None:
        """Why `voice` cannot be asked of this provider, or None (None = its default)."""
        if voice is None or self.known_voices is None or voice in self.known_voices:
            return None
        return f"{self.name.value} has no voice {voice!r}; its voices: {', '.join(sorted(self.known_voices))}"

    def unavailable_reason(self) -> str | None:
        """Why this provider cannot be used as configured (e.g. no API key), or None."""
        return None

    async def check(self) -> None:
        """Make sure the provider can speak now; raise `ProviderUnavailable` if not."""
        await self.open()

    async def open(self) -> None:
        """Acquire the resources synthesis needs; idempotent."""

    async def aclose(self) -> None:
        """Release what `open` acquired; the provider can be opened again later."""

    @abc.abstractmethod
    def synthesize(self, text: str, voice: str | None, speed: float | None) -> AsyncIterator[bytes]:
        """Yield PCM s16le mono bytes for `text` as they are produced."""
