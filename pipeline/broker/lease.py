"""The speaker lease: one key in Redis naming the daemon that speaks, with a time to live.

Every daemon tries to take it (SET NX PX) every sixth of `speaker_lease_s`; the holder
renews it every third, with a script that renews only a lease still its own. A holder that
cannot renew (the broker is gone, or someone else holds the key) stops speaking before its
lease can have expired in the broker, so two daemons never speak at once; the broker's
fenced writes (link.FENCED_WRITE) refuse a stale speaker's output besides.

    edge ──SET NX succeeds──► speaker ──renewal refused, or none for lease - tick──► edge
"""

from __future__ import annotations

import contextlib
from typing import Final

import structlog
import trio

from pipeline.broker.link import LEASE_KEY, BrokerDown, BrokerLink

log = structlog.get_logger()

# Ticks per lease: the holder renews this often (so one lost renewal is no loss) ...
TICKS_PER_LEASE: Final = 3
# ... and the others try to take it twice as often: a lease renewed just before its holder
# died expires `lease` later, and is taken at most half a tick after that, well within
# the contract's `lease + 1 s` even on a busy machine.
TRIES_PER_TICK: Final = 2


class SpeakerLease:
    """Takes, renews and loses the lease; `term()` is each stretch of holding it.

    Error handling: a broker error is a failed tick (never raised); holding ends when
    renewals have failed for `lease - tick` seconds.
    """

    def __init__(self, link: BrokerLink, lease_s: float) -> None:
        self.link = link
        self.lease_ms = round(lease_s * 1000)
        self.tick = lease_s / TICKS_PER_LEASE
        self.held = False
        self.holder_known = False  # some daemon (maybe this one) held the lease at the last tick
        self.stopping = False  # the daemon drains: never take the lease again
        self._renewed_at = 0.0
        self._gained = trio.Event()
        self._term: trio.CancelScope | None = None

    async def run(self) -> None:
        """Tick forever."""
        while True:
            # A hung broker must not hold the tick up past the point of stepping down.
            with trio.move_on_after(self.tick), contextlib.suppress(*BrokerDown):
                await self._tick()
            if self.held and trio.current_time() - self._renewed_at > self.tick * (TICKS_PER_LEASE - 1):
                self.lose("no renewal got through")
            if self.link.problem() is not None:
                self.holder_known = False
            await trio.sleep(self.tick if self.held else self.tick / TRIES_PER_TICK)

    async def _tick(self) -> None:
        asked_at = trio.current_time()
        if self.held:
            if await self.link.call(self.link.renew, keys=[LEASE_KEY], args=[self.link.daemon_id, self.lease_ms]):
                self._renewed_at = asked_at
            else:
                self.lose("another daemon holds the lease")
            return
        if self.stopping:
            return
        took = await self.link.call(self.link.redis.set, LEASE_KEY, self.link.daemon_id, nx=True, px=self.lease_ms)
        self.holder_known = True
        if took:
            self.held = True
            self._renewed_at = asked_at
            log.info("speaker.elected", daemon=self.link.daemon_id)
            self._gained.set()

    async def next_term(self) -> trio.CancelScope:
        """Wait until this daemon holds the lease; the scope to run its term in (cancelled
        when the lease is lost)."""
        await self._gained.wait()
        self._gained = trio.Event()
        self._term = trio.CancelScope()
        if not self.held:
            self._term.cancel()
        return self._term

    def lose(self, why: str) -> None:
        """Stop speaking now (the term's scope is cancelled)."""
        if self.held:
            log.warning("speaker.lost_lease", daemon=self.link.daemon_id, reason=why)
        self.held = False
        if self._term is not None:
            self._term.cancel()

    async def release(self) -> None:
        """Give the lease up at once (the daemon stops), so the next speaker need not wait
        for it to expire. Error handling: a broker that is gone lets it expire instead."""
        self.stopping = True
        was_held, self.held = self.held, False
        if was_held:
            with contextlib.suppress(*BrokerDown):
                await self.link.call(self.link.release, keys=[LEASE_KEY], args=[self.link.daemon_id])
            log.info("speaker.released", daemon=self.link.daemon_id)
