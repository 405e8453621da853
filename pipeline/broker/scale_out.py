"""The daemon's entry point into the broker (DESIGN.md section 13): in place of the
router and the chunker, a daemon with `broker` set runs this. Every daemon forwards its
commands to the broker and feeds its broadcaster from the speaker's output; the one that
holds the lease runs a SpeakerTerm besides.

    intake, HTTP face ─commands─► ScaleOut ─► CommandForwarder ─► broker
    broker ─► OutputReader ─► outbox ─► broadcaster
    SpeakerLease ─ elected ─► SpeakerTerm (router + chunker + publisher) ─ lost ─► cancelled
"""

from __future__ import annotations

import secrets

import structlog
import trio

from pipeline.broker.edge import CommandForwarder, OutputReader
from pipeline.broker.lease import SpeakerLease
from pipeline.broker.link import BrokerLink
from pipeline.broker.speaker import SpeakerTerm
from pipeline.broker.view import ClusterView
from pipeline.config import Settings
from pipeline.flow import Envelope, Outgoing, Shutdown
from pipeline.metrics import Metrics
from pipeline.providers.registry import ProviderSet

log = structlog.get_logger()

# After the speaking utterance's grace, how long a stopping speaker waits for its last
# output to be published and read back before closing its own subscribers anyway.
STOP_SLACK_S = 2.0


class ScaleOut:
    """One daemon's part in a group sharing a broker.

    Resource handling: owns the Redis client (closed when `run` ends), the lease and the
    current term. Error handling: the broker going away makes every command answer
    `provider_unavailable` and `problem()` say why (so /readyz is 503); every loop
    retries by itself, so the daemon recovers when the broker returns.
    """

    def __init__(
        self,
        settings: Settings,
        providers: ProviderSet,
        commands: trio.MemoryReceiveChannel[Envelope | Shutdown],
        outbox: trio.MemorySendChannel[Outgoing],
        metrics: Metrics,
    ) -> None:
        assert settings.broker is not None
        self.settings = settings
        self.providers = providers
        self.commands = commands
        self.outbox = outbox
        self.metrics = metrics
        self.daemon_id = secrets.token_hex(4)
        # Connection ids are global: each daemon numbers its own from a random base (2^32
        # apart), so a reply or an utterance's owner names one connection in the group.
        self.conn_id_base = secrets.randbits(31) << 32
        self.link = BrokerLink(settings.broker, self.daemon_id)
        self.view = ClusterView()
        self.lease = SpeakerLease(self.link, settings.speaker_lease_s)
        self.forwarder = CommandForwarder(self.link, outbox, self.conn_id_base)
        self.reader = OutputReader(self.link, outbox, self.view, self.forwarder)
        self.term: SpeakerTerm | None = None
        self._reader_scope = trio.CancelScope()
        metrics.speaker.set(0)

    def role(self) -> str:
        """What /v1/info says: `speaker` while this daemon holds the lease, else `edge`."""
        return "speaker" if self.lease.held else "edge"

    def problem(self) -> str | None:
        """Why this daemon cannot serve commands now (for /readyz), or None."""
        if (problem := self.link.problem()) is not None:
            return problem
        return None if self.lease.holder_known else "no daemon is the speaker yet"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        log.info("broker.joining", daemon=self.daemon_id, lease_s=self.settings.speaker_lease_s)
        try:
            async with self.commands, self.outbox, trio.open_nursery() as nursery:
                nursery.start_soon(self.lease.run)
                nursery.start_soon(self._read_output)
                nursery.start_soon(self._speak_while_elected)
                task_status.started()
                async for envelope in self.commands:
                    if isinstance(envelope, Shutdown):
                        await self._shut_down(envelope)
                    else:
                        await self.forwarder.forward(envelope)
                nursery.cancel_scope.cancel()
        finally:
            self.link.close()

    async def _read_output(self) -> None:
        with self._reader_scope:
            await self.reader.run()

    async def _speak_while_elected(self) -> None:
        while True:
            scope = await self.lease.next_term()
            term = SpeakerTerm(self.settings, self.providers, self.metrics, self.link, self.lease, self.reader, self.view)
            with scope:
                self.term = term
                self.metrics.speaker.set(1)
                try:
                    await term.run()
                finally:
                    self.term = None
                    self.metrics.speaker.set(0)
            if scope.cancelled_caught:
                log.info("speaker.stepped_down", daemon=self.daemon_id)

    async def _shut_down(self, shutdown: Shutdown) -> None:
        """The daemon drains (DESIGN.md section 3, as the router does alone): a speaker lets
        its speaking utterance finish within the grace (the queued ones end `cancelled`),
        publishes that, and gives the lease up at once; then this daemon's subscribers get
        everything read so far and the broadcaster closes them."""
        self.lease.stopping = True
        term = self.term
        last = None
        if term is not None and term.control is not None and self.lease.held:
            with trio.move_on_after(shutdown.grace + STOP_SLACK_S):
                await term.control.send(shutdown)
                await term.published_all.wait()
            last = term.last_published
        shutdown.spoken.set()
        await self.lease.release()
        if last is not None:
            with trio.move_on_after(STOP_SLACK_S):
                await self.reader.reached(last)
        self._reader_scope.cancel()
        await self.outbox.send(shutdown)
