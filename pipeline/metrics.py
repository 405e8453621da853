"""The Prometheus metrics of one daemon (names as in DESIGN.md section 7).

Each daemon creates its own `Metrics`, holding its own CollectorRegistry rather than the
process-wide default, so several daemons in one process (the tests) never collide. The
broadcaster counts what reaches subscribers; the speaker counts provider failures; the
HTTP face renders the registry at `GET /metrics`.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# TTFA is tens to hundreds of milliseconds when healthy, seconds when a provider is slow.
TTFA_BUCKETS: Final = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST


class Metrics:
    """The metric objects of one daemon and the registry they live in.

    Error handling: recording never raises for a label value; callers pass strings
    (a missing provider is recorded as "none").
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.utterances = Counter(
            "speechcast_utterances",
            "Utterances finished, by the provider that spoke them first and their status",
            ("provider", "status"),
            registry=self.registry,
        )
        self.ttfa = Histogram(
            "speechcast_ttfa_seconds",
            "Time from receiving send_message to writing the utterance's first chunk",
            buckets=TTFA_BUCKETS,
            registry=self.registry,
        )
        self.chunks_sent = Counter(
            "speechcast_chunks_sent",
            "Audio chunks written to subscribers (one per chunk per subscriber)",
            registry=self.registry,
        )
        self.bytes_sent = Counter(
            "speechcast_bytes_sent",
            "Bytes of audio frames written to subscribers",
            registry=self.registry,
        )
        self.subscribers = Gauge(
            "speechcast_subscribers",
            "Connections now subscribed to the audio stream",
            registry=self.registry,
        )
        self.provider_failures = Counter(
            "speechcast_provider_failures",
            "Provider failures while speaking, by provider and error code",
            ("provider", "code"),
            registry=self.registry,
        )

        self.speaker = Gauge(
            "speechcast_speaker",
            "1 on the daemon that speaks (a daemon alone, or the holder of the broker's lease), else 0",
            registry=self.registry,
        )
        self.speaker.set(1)

    def utterance_finished(self, provider: str | None, status: str) -> None:
        self.utterances.labels(provider or "none", status).inc()

    def chunk_sent(self, size: int) -> None:
        self.chunks_sent.inc()
        self.bytes_sent.inc(size)

    def provider_failed(self, provider: str, code: str) -> None:
        self.provider_failures.labels(provider, code).inc()

    def render(self) -> bytes:
        """The registry in the Prometheus text format (serve with CONTENT_TYPE)."""
        return generate_latest(self.registry)
