"""A circuit breaker per provider, so a dead server is skipped instead of waited for.

The router asks `allow()` before it uses a provider and reports each outcome with
`record_success()` / `record_failure()`. States:

    closed ──(`failures` failures in a row)──► open ──(`cooldown` s pass)──► half-open
      ▲                                          ▲                              │
      └────────────── success ───────────────────┼──────── failure ─────────────┘

While half-open, `needs_probe` is True: the caller probes with `provider.check()` before
giving it real text, then records the probe's outcome. Time is `trio.current_time()`, so
tests drive the cooldown with `trio.testing.MockClock`.
"""

from __future__ import annotations

import enum

import trio


class BreakerState(enum.StrEnum):
    """Where a breaker stands; the value is what logs and metrics show."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts failures in a row and keeps a failing provider out of use for a cooldown.

    Error handling: it never raises; `allow()` is the whole answer.
    """

    def __init__(self, failures: int, cooldown: float) -> None:
        if failures < 1:
            raise ValueError("failures must be at least 1")
        self.failures = failures
        self.cooldown = cooldown
        self._in_a_row = 0
        self._opened_at: float | None = None

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if trio.current_time() - self._opened_at >= self.cooldown:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    @property
    def needs_probe(self) -> bool:
        """True when the cooldown is over and the provider must be probed before use."""
        return self.state is BreakerState.HALF_OPEN

    def allow(self) -> bool:
        """May the provider be used now? False only while open and cooling down."""
        return self.state is not BreakerState.OPEN

    def cooldown_left(self) -> float:
        """Seconds until an open circuit may be probed again (0 when not open)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown - trio.current_time())

    def record_success(self) -> None:
        """The provider worked: close the circuit and forget past failures."""
        self._in_a_row = 0
        self._opened_at = None

    def record_failure(self) -> None:
        """The provider failed: open after `failures` in a row; a failed probe reopens."""
        self._in_a_row += 1
        state = self.state
        if state is BreakerState.HALF_OPEN or (
            state is BreakerState.CLOSED and self._in_a_row >= self.failures
        ):
            self._opened_at = trio.current_time()
        # Already open and cooling down: a late failure of a request that started before
        # the circuit opened must not extend the cooldown.

    def __repr__(self) -> str:
        return f"CircuitBreaker(state={self.state.value}, failures_in_a_row={self._in_a_row})"
