"""Bounds on one piece's synthesis, whatever the provider: a total deadline and a cap on
the audio, both growing with the piece's text. `pipeline.speaking` enforces them around
every provider, so no answer (a body trickling one byte a second, an endless body, a
header that makes 4 KB into 40 minutes) can hold the queue or flood the subscribers.

    deadline  = piece_timeout + piece_timeout_per_char × characters × max(1, 1/speed)
    max audio = (max_audio_base + max_audio_per_char × characters) / speed

Why these shapes and defaults (20 s + 0.2 s/char; 5 s + 1.0 s/char):
- Time: an HTTP server may pace its answer near real time, and slow speech is longer,
  so the per-character part grows with 1/speed (never shrinks below speed 1: a fast
  voice does not make the server compute faster). The fixed part covers connecting,
  a cold model and retries before the first byte.
- Audio: plain English is ~0.065 s of speech per character; numbers read out are far
  longer. Measured with the embedded voice at speed 1: "$29.99" 0.34 s/char,
  "1234567890123" 0.55, "99999999999999999999" 0.63 (the worst found). 1.0 s/char is
  1.6 times that worst case; the 5 s base covers one-character pieces ("7": 0.5 s).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Settings
from pipeline.errors import ProviderFailed, ProviderTimeout

BYTES_PER_SAMPLE = 2  # s16le mono, what every provider yields


@dataclass(frozen=True)
class PieceBounds:
    """The limits of one piece (see the module docstring); defaults are the settings'."""

    timeout: float = Settings.piece_timeout
    timeout_per_char: float = Settings.piece_timeout_per_char
    audio_base: float = Settings.max_audio_base
    audio_per_char: float = Settings.max_audio_per_char

    @classmethod
    def from_settings(cls, settings: Settings) -> PieceBounds:
        return cls(settings.piece_timeout, settings.piece_timeout_per_char,
                   settings.max_audio_base, settings.max_audio_per_char)

    def deadline(self, text: str, speed: float) -> float:
        """Seconds the whole piece (every retry included) may take."""
        return self.timeout + self.timeout_per_char * len(text) * max(1.0, 1.0 / speed)

    def audio_seconds(self, text: str, speed: float) -> float:
        """The longest audio the piece's text can hold."""
        return (self.audio_base + self.audio_per_char * len(text)) / speed

    def audio_bytes(self, text: str, speed: float, sample_rate: int) -> int:
        """`audio_seconds` as bytes of s16le mono at `sample_rate` (whole samples)."""
        return int(self.audio_seconds(text, speed) * sample_rate) * BYTES_PER_SAMPLE

    def timed_out(self, provider: str, text: str, speed: float) -> ProviderTimeout:
        limit = self.deadline(text, speed)
        return ProviderTimeout(
            f"{provider} did not finish a piece of {len(text)} characters within {limit:.1f} s (piece_timeout "
            f"{self.timeout:g} s + piece_timeout_per_char {self.timeout_per_char:g} s per character); "
            "the server is too slow or trickling its answer")

    def too_much_audio(self, provider: str, text: str, speed: float) -> ProviderFailed:
        error = ProviderFailed(
            f"{provider} answered more audio than the text can hold: over "
            f"{self.audio_seconds(text, speed):.1f} s for {len(text)} characters (max_audio_base "
            f"{self.audio_base:g} s + max_audio_per_char {self.audio_per_char:g} s per character); the rest "
            "of the piece was cut off")
        error.retryable = False
        return error
