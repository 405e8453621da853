"""The daemon's connection to Redis, for trio: redis-py's blocking client, each call in a
worker thread (`trio.to_thread.run_sync`), plus the broker's keys and its one Lua script.

Why threads and not redis-py's asyncio client: the daemon runs on trio, and bridging
asyncio in (trio-asyncio) would put a second event loop and its cancellation rules under
every broker call. A blocking call in a thread is cancellable from trio (the thread is
abandoned and ends by itself within its own timeout), ordered (one task awaits one call at
a time), and costs ~0.1 ms per call, far below a 200 ms audio chunk. Blocking reads
(XREAD BLOCK) hold a pooled connection of their own for at most BLOCK_MS, so an abandoned
read ends soon. docs/scale-out.md has the measured cost.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Final

import redis
import structlog
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

log = structlog.get_logger()

PREFIX: Final = "speechcast:"
LEASE_KEY: Final = PREFIX + "speaker"  # the speaker's daemon id, with a TTL (the lease)
COMMANDS_KEY: Final = PREFIX + "commands"  # stream: every daemon's commands, for the speaker
OUT_KEY: Final = PREFIX + "out"  # stream: the speaker's frames and events, for every daemon
STATE_KEY: Final = PREFIX + "state"  # hash: what a new speaker continues from
# A blocking read returns at least this often (ms), so a cancelled read's thread ends soon.
BLOCK_MS: Final = 1000
# Streams are capped (approximately, which Redis does cheaply). The output stream holds
# ~100 s of speech (5 entries per second of audio): a daemon further behind is dead anyway.
OUT_MAXLEN: Final = 500
COMMANDS_MAXLEN: Final = 10000
# Worker threads the broker may use at once: two blocking reads and a few short calls.
THREADS: Final = 8

# Applied atomically by Redis: only while `me` holds the lease may anything be appended to
# the output stream or the state changed, so a speaker that lost its lease (paused, cut
# off) can never speak over its successor. KEYS: lease, out, state. ARGV: me, maxlen,
# the number of stream fields (0: append nothing), those fields, then state field/values.
FENCED_WRITE: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
local n = tonumber(ARGV[3])
local id = true
if n > 0 then
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 4, 3 + n))
end
if #ARGV > 3 + n then
  redis.call('HSET', KEYS[3], unpack(ARGV, 4 + n, #ARGV))
end
return id
"""
# Renew the lease only if it is still ours. KEYS: lease. ARGV: me, ttl ms.
RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# Give the lease up only if it is ours (a stopping speaker lets the next one in at once).
RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Every error of the client counts as "the broker cannot be used now": unreachable, but
# also an answer such as OOM or READONLY (a replica); every loop retries, none crashes.
BrokerDown = (redis.RedisError,)


class BrokerLink:
    """One daemon's Redis client and what it knows of the broker's health.

    Resource handling: a connection pool (threads take connections as they need them);
    `close` releases it. Error handling: `call` raises what redis-py raises; a
    connection or timeout error also marks the broker down (`problem`), and the next
    call that succeeds marks it up again.
    """

    def __init__(self, url: str, daemon_id: str) -> None:
        self.daemon_id = daemon_id
        # No retries inside redis-py: the daemon's own loops retry, and a down broker must
        # be noticed within a second, not after redis-py's backoff.
        self.redis = redis.Redis.from_url(
            url,
            socket_connect_timeout=1.0,
            socket_timeout=BLOCK_MS / 1000 + 2.0,
            retry=Retry(NoBackoff(), 0),
            client_name=f"speechcast-{daemon_id}",
        )
        self.fenced_write = self.redis.register_script(FENCED_WRITE)
        self.renew = self.redis.register_script(RENEW)
        self.release = self.redis.register_script(RELEASE)
        self.limiter = trio.CapacityLimiter(THREADS)
        self._problem: str | None = "the broker has not answered yet"

    def problem(self) -> str | None:
        """Why the broker cannot be used now (None: its last call succeeded)."""
        return self._problem

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one blocking redis-py call in a worker thread (its answer as redis-py gives
        it: bytes, lists and dicts of bytes; typed Any as redis-py's own answers are)."""
        try:
            result = await trio.to_thread.run_sync(
                functools.partial(fn, *args, **kwargs), abandon_on_cancel=True, limiter=self.limiter
            )
        except BrokerDown as e:
            if self._problem is None:
                log.warning("broker.down", error=type(e).__name__)
            what = "unreachable" if isinstance(e, (redis.ConnectionError, redis.TimeoutError)) else "refusing commands"
            self._problem = f"the broker is {what} ({type(e).__name__})"
            raise
        if self._problem is not None:
            log.info("broker.up")
            self._problem = None
        return result

    def close(self) -> None:
        self.redis.close()
