"""Speaking one utterance: split it into pieces, synthesize them in order with bounded
lookahead, and fail over to the next provider when one breaks.

The router calls `speak` for each utterance; everything it produces goes to the chunker
through `emit`: UtteranceBegin just before the first audio, then Audio and the words and
visemes of each piece (Timing, DESIGN.md section 11), plus `error` events for provider
failures. It returns the utterance's status (ok · partial · failed).
Cancellation (the router's per-utterance cancel scope) stops every synthesis at once.

(About 400 lines: one utterance's run — pieces, lookahead, failover, per-piece bounds, and
where each piece's words fall on the utterance's audio, which depends on all of them — is
one piece of logic. The timing rules themselves live in pipeline/timing.py.)
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field

import structlog
import trio

from pipeline.audio import Resampler, SampleAligner
from pipeline.commands import TTSProvider
from pipeline.errors import ProviderError, ProviderFailed
from pipeline.events import ErrorEvent, Status
from pipeline.flow import Audio, Broadcast, Speech, UtteranceBegin
from pipeline.metrics import Metrics
from pipeline.piece_bounds import PieceBounds
from pipeline.providers.base import Provider
from pipeline.providers.registry import ProviderSet
from pipeline.streaming import TextStream
from pipeline.text import iter_pieces
from pipeline.timing import Estimate, OffsetFinder, PieceTiming, TimedPCM, Timeline, words_of

log = structlog.get_logger()

# Up to this length segmentation costs under a millisecond and runs on the event loop.
INLINE_SEGMENT_CHARS = 300


@dataclass(frozen=True)
class Utterance:
    """One accepted send_message, or a streaming utterance (`stream`: its text arrives
    while it waits and speaks; `text` is then empty)."""

    id: str
    text: str
    voice: str | None
    speed: float | None
    provider: TTSProvider | None  # a one-off choice; None = the session's current one
    owner: int | None  # the WebSocket connection that submitted it (None: over HTTP)
    received_at: float
    stream: TextStream | None = field(default=None, compare=False)

    @property
    def first_text_at(self) -> float:
        """What TTFA counts from: the arrival of the text, or for a stream of the text that
        completed its first piece (DESIGN.md section 10)."""
        if self.stream is not None and self.stream.first_piece_at is not None:
            return self.stream.first_piece_at
        return self.received_at


@dataclass
class _Piece:
    """One piece being synthesized: its text, provider and the audio it has produced."""

    text: str
    offset: int  # where `text` starts in the utterance's text (code points)
    provider: TTSProvider
    audio: trio.MemoryReceiveChannel[bytes | ProviderError]
    scope: trio.CancelScope
    # Set once the piece has its first audio (or has ended): the next piece starts then,
    # so lookahead never delays an earlier piece's first audio.
    underway: trio.Event
    # Set once the piece's synthesis has begun. A provider that runs pieces side by side
    # (max_parallel > 1: Piper's worker processes, which return a piece whole) starts
    # piece k+1 then, for k >= 1: only the utterance's first piece, which decides first
    # audio, runs alone; later ones have the playing time of the audio before them.
    started: trio.Event


class Speaker:
    """Speaks utterances on a ProviderSet, at the daemon's output sample rate."""

    def __init__(
        self,
        providers: ProviderSet,
        *,
        sample_rate: int,
        fallback: tuple[str, ...],
        lookahead: int,
        short_first_piece: bool,
        metrics: Metrics | None = None,
        bounds: PieceBounds | None = None,
    ) -> None:
        self.providers = providers
        self.bounds = bounds or PieceBounds()
        self.metrics = metrics or Metrics()
        self.sample_rate = sample_rate
        self.fallback = tuple(TTSProvider(p) for p in fallback)
        self.lookahead = lookahead
        self.short_first_piece = short_first_piece

    def chain(self, first: TTSProvider) -> list[TTSProvider]:
        """The providers to try, in order: the chosen one, then the fallback list."""
        return [first] + [p for p in self.fallback if p != first]

    async def speak(self, utt: Utterance, first: TTSProvider, emit: Callable[[Speech], Awaitable[None]]) -> Status:
        texts: _Pieces | TextStream = utt.stream or _Pieces(
            iter_pieces(utt.text, short_first=self.short_first_piece), offload=len(utt.text) > INLINE_SEGMENT_CHARS,
            text=utt.text,
        )
        chain = self.chain(first)
        run = _Run(self, utt, chain, emit)
        async with trio.open_nursery() as nursery:
            run.nursery = nursery
            status = await run.all_pieces(texts)
            nursery.cancel_scope.cancel()  # lookahead jobs of pieces never needed
        return status


class _Pieces:
    """The utterance's pieces, segmented only as far as they are asked for; for long texts
    in a worker thread (segmenting 4 KB takes ~12 ms, a few hundred characters < 1 ms)."""

    def __init__(self, pieces: Iterator[str], *, offload: bool, text: str) -> None:
        self._pieces = pieces
        self._offload = offload
        self._known: list[str] = []
        self._offsets: list[int] = []
        self._finder = OffsetFinder(text)
        self._exhausted = False

    async def get(self, index: int) -> str | None:
        """Piece `index` (stripped), or None past the last one."""
        while len(self._known) <= index and not self._exhausted:
            if self._offload:
                piece = await trio.to_thread.run_sync(next, self._pieces, None)
            else:
                piece = next(self._pieces, None)
            if piece is None:
                self._exhausted = True
            elif piece.strip():
                self._known.append(piece.strip())
                self._offsets.append(self._finder.locate(piece.strip()))
        return self._known[index] if index < len(self._known) else None

    def offset(self, index: int) -> int:
        """Where piece `index` (one already got) starts in the utterance's text."""
        return self._offsets[index]

    async def peek(self, index: int) -> str | None:
        """For lookahead: a whole text's later pieces are worth segmenting now."""
        return await self.get(index)


class _Run:
    """The state of one `speak` call (kept out of Speaker so Speaker stays reusable)."""

    nursery: trio.Nursery

    def __init__(self, speaker: Speaker, utt: Utterance, chain: list[TTSProvider], emit: Callable[[Speech], Awaitable[None]]) -> None:
        self.speaker, self.utt, self.chain, self.emit = speaker, utt, chain, emit
        self.position = 0  # index in chain of the provider now speaking
        self.began = False
        self.resampler: Resampler | None = None
        self.resampler_provider: TTSProvider | None = None
        self.lost_text = False
        # The utterance's clock (output samples): what was emitted, where the current
        # resampler's output began and how much input it has taken (pipeline.timing).
        self.out_samples = 0
        self.segment_origin = 0
        self.in_fed = 0
        self.timeline = Timeline(speaker.sample_rate)
        self.any_estimated = False

    async def current(self) -> TTSProvider | None:
        """The provider to use now: the first usable one from `position` on the chain."""
        while self.position < len(self.chain):
            name = self.chain[self.position]
            if await self.speaker.providers.usable(name):
                return name
            self.position += 1
        return None

    def _start(self, text: str, offset: int, name: TTSProvider, after: _Piece | None, *, after_first: bool) -> _Piece:
        send, receive = trio.open_memory_channel[bytes | ProviderError](math.inf)
        job = _Piece(text, offset, name, receive, trio.CancelScope(), trio.Event(), trio.Event())
        provider = self.speaker.providers.get(name)
        wait = None
        if after is not None:
            side_by_side = provider.max_parallel > 1 and after.provider == name and not after_first
            wait = after.started if side_by_side else after.underway
        self.nursery.start_soon(_synthesize_piece, provider, job, self.utt, self._voice_of(name), send, wait, self.speaker.bounds)
        return job

    def _voice_of(self, name: TTSProvider) -> str | None:
        """The voice asked of provider `name` (None: its default). A voice is a name in the
        chosen provider's catalogue: a fallback speaks with its own default."""
        return self.utt.voice if name == self.chain[0] else None

    async def all_pieces(self, texts: _Pieces | TextStream) -> Status:
        jobs: dict[int, _Piece] = {}
        index = 0
        while await texts.get(index) is not None:
            name = await self.current()
            if name is None:
                self.lost_text = True
                break
            # Keep `lookahead` pieces synthesizing beyond the one streaming out.
            for ahead in range(index, index + 1 + self.speaker.lookahead):
                # (A stream's later pieces only if they are complete already: never wait.)
                text = await texts.get(ahead) if ahead == index else await texts.peek(ahead)
                if text is not None and ahead not in jobs:
                    jobs[ahead] = self._start(
                        text, texts.offset(ahead), name, after=jobs.get(ahead - 1), after_first=ahead == 1
                    )
            job = jobs.pop(index)
            sent_any, failure = await self._stream(job)
            if failure is None:
                self.speaker.providers.record_success(job.provider)
                index += 1
                continue
            await self._report(job.provider, failure)
            # Lookahead jobs on the failed provider are restarted on the next one.
            for later in [k for k, j in jobs.items() if j.provider == job.provider]:
                jobs.pop(later).scope.cancel()
            if sent_any:
                # A piece that broke off midway is not repeated: continue with the next.
                self.lost_text = True
                index += 1
        await self._flush()
        if (last := self.timeline.close(self.utt.id, self.out_samples, estimated=self.any_estimated)) is not None:
            await self.emit(last)
        if self.utt.stream is not None and self.utt.stream.cut_short:
            self.lost_text = True  # its client left (or went quiet) mid-piece
        if not self.began:
            return Status.FAILED
        return Status.PARTIAL if self.lost_text else Status.OK

    async def _stream(self, job: _Piece) -> tuple[bool, ProviderError | None]:
        """Forward one piece's audio; returns (any audio sent, the failure or None)."""
        aligner = SampleAligner()
        sent_any = False
        clock = _PieceClock(self, job)
        async for item in job.audio:
            if isinstance(item, ProviderError):
                return sent_any, item
            if isinstance(item, TimedPCM) and not sent_any:
                clock.exact = item.timing
            pcm = aligner.feed(item)
            if pcm:
                await self._ensure_resampler(job.provider)
                await clock.before_audio(len(pcm) // 2)
                await self._send_pcm(job.provider, pcm)
                sent_any = True
        if sent_any:
            await clock.at_end()
        if aligner.leftover:
            # The answer ended inside a sample: half a sample cannot be played, so it is
            # dropped (a body that broke off is already a failure, reported above).
            log.warning("provider.half_sample", provider=job.provider.value, bytes=aligner.leftover)
        if not sent_any:
            return False, ProviderFailed(f"{job.provider.value} produced no audio for the piece")
        return True, None

    async def _ensure_resampler(self, name: TTSProvider) -> None:
        """A resampler from `name`'s rate (the previous provider's is flushed first), and
        the utterance's clock told where its output begins."""
        if self.resampler_provider != name:
            await self._flush()
            rate = self.speaker.providers.get(name).sample_rate
            self.resampler = Resampler(rate, self.speaker.sample_rate)
            self.resampler_provider = name
            self.segment_origin, self.in_fed = self.out_samples, 0

    async def _send_pcm(self, name: TTSProvider, pcm: bytes) -> None:
        """Resample and emit `pcm` (through the resampler `_ensure_resampler(name)` made)."""
        assert self.resampler is not None and self.resampler_provider == name
        self.in_fed += len(pcm) // 2
        await self._emit_audio(self.resampler.feed(pcm), name)

    async def _flush(self) -> None:
        if self.resampler is not None and self.resampler_provider is not None:
            await self._emit_audio(self.resampler.flush(), self.resampler_provider)
        self.resampler = self.resampler_provider = None

    async def _begin(self, name: TTSProvider) -> None:
        if not self.began:
            self.began = True
            provider = self.speaker.providers.get(name)
            await self.emit(
                UtteranceBegin(self.utt.id, name, self._voice_of(name) or provider.default_voice, self.utt.owner, self.utt.first_text_at)
            )

    async def _emit_audio(self, pcm: bytes, name: TTSProvider) -> None:
        if not pcm:
            return
        await self._begin(name)
        self.out_samples += len(pcm) // 2
        await self.emit(Audio(self.utt.id, pcm))

    async def _report(self, name: TTSProvider, failure: ProviderError) -> None:
        self.speaker.providers.record_failure(name, failure)
        self.speaker.metrics.provider_failed(name.value, failure.code)
        self.position += 1
        successor = await self.current()
        recovered = successor is not None
        log.warning("provider.failed", provider=name.value, code=failure.code, error=failure.message, recovered=recovered)
        text = f"{name.value} failed: {failure.message}"
        if successor is not None:
            text += f"; continuing with {successor.value}"
            log.info("provider.recovered", failed=name.value, provider=successor.value)
        await self.emit(
            Broadcast(ErrorEvent(failure.code, text, utterance_id=self.utt.id, recovered=recovered), also_to=self.utt.owner)
        )


class _PieceClock:
    """One piece's words and visemes on the utterance's clock: the provider's own timings
    (`exact`, set from its first audio, emitted before that audio) or an estimate over
    the piece's whole audio, emitted at its end (pipeline.timing.Estimate)."""

    def __init__(self, run: _Run, job: _Piece) -> None:
        self.run, self.job = run, job
        self.words = words_of(job.text)
        self.exact: PieceTiming | None = None
        self.origin = 0.0
        self.fed = 0  # the piece's input samples so far
        self.rate = run.speaker.providers.get(job.provider).sample_rate

    async def before_audio(self, samples: int) -> None:
        run = self.run
        if self.fed == 0:
            # Where the piece's first sample lands: after what the current resampler took.
            self.origin = run.segment_origin + run.in_fed * run.speaker.sample_rate / self.rate
            if self.exact is not None:
                await self._place(self.exact, estimated=False)
        self.fed += samples

    async def at_end(self) -> None:
        if self.exact is None:
            await self._place(Estimate(self.words).place(self.fed), estimated=True)

    async def _place(self, timing: PieceTiming, *, estimated: bool) -> None:
        if not timing.words and not timing.visemes:
            return
        run = self.run
        run.any_estimated = run.any_estimated or estimated
        await run._begin(self.job.provider)
        placed = run.timeline.place(run.utt.id, self.words, self.job.offset, timing, self.origin, self.rate, estimated=estimated)
        await run.emit(placed)


async def _synthesize_piece(
    provider: Provider,
    job: _Piece,
    utt: Utterance,
    voice: str | None,
    out: trio.MemorySendChannel[bytes | ProviderError],
    after: trio.Event | None,
    bounds: PieceBounds,
) -> None:
    """Run one provider on one piece in `voice` (None: its default), passing audio (or
    the failure) into `out`; start only once `after` is set (the previous piece is under
    way, or, side by side, started).

    Error handling: whatever the provider, the piece ends with `ProviderTimeout` past its
    deadline and is cut off with `ProviderFailed` past its audio cap (`bounds`); the audio
    up to the cap has gone out. Both close the provider's stream (an HTTP request is
    dropped, so the server stops too)."""
    async with out:
        with job.scope:
            try:
                if after is not None:
                    await after.wait()
                job.started.set()
                speed = utt.speed or provider.default_speed
                room = bounds.audio_bytes(job.text, speed, provider.sample_rate)
                with trio.move_on_after(bounds.deadline(job.text, speed)) as timer:
                    stream: AsyncIterator[bytes] = provider.synthesize(job.text, voice, utt.speed)
                    async with aclosing(stream):  # type: ignore[type-var]
                        async for pcm in stream:
                            if len(pcm) > room:
                                if room:
                                    await out.send(pcm[:room])
                                raise bounds.too_much_audio(provider.name.value, job.text, speed)
                            room -= len(pcm)
                            if pcm:
                                job.underway.set()
                                await out.send(pcm)
                if timer.cancelled_caught:
                    await out.send(bounds.timed_out(provider.name.value, job.text, speed))
            except ProviderError as e:
                await out.send(e)
            except Exception as e:  # a provider bug must not take the daemon down
                log.exception("provider.crashed", provider=provider.name.value)
                await out.send(ProviderFailed(f"{provider.name.value} crashed: {type(e).__name__}"))
            finally:
                job.started.set()
                job.underway.set()

