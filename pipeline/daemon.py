"""The daemon: the four actors in one nursery, joined by bounded memory channels.

    WS clients ─► intake ─commands─► router ─speech─► chunker ─outbox─► broadcaster ─► subscribers
                    └────────────── Join / Leave / error replies ──outbox──┘
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog
import trio

from actors.broadcaster import Broadcaster
from actors.chunker import Chunker
from actors.intake import Intake
from actors.router import Router
from pipeline import __version__
from pipeline.config import Settings
from pipeline.flow import Envelope, Outgoing, Speech
from pipeline.providers.registry import ProviderSet, default_providers

log = structlog.get_logger()

# Channel sizes: enough to absorb a burst, small enough that backpressure is felt.
COMMAND_BUFFER = 64
SPEECH_BUFFER = 64
OUTBOX_BUFFER = 256


@dataclass(frozen=True)
class RunningDaemon:
    """What a started daemon tells its caller."""

    port: int
    settings: Settings


async def serve(
    settings: Settings,
    providers: ProviderSet | None = None,
    *,
    task_status: trio.TaskStatus[RunningDaemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until cancelled; `task_status` reports once it is listening."""
    providers = providers or default_providers(settings)
    commands_send, commands_recv = trio.open_memory_channel[Envelope](COMMAND_BUFFER)
    speech_send, speech_recv = trio.open_memory_channel[Speech](SPEECH_BUFFER)
    outbox_send, outbox_recv = trio.open_memory_channel[Outgoing](OUTBOX_BUFFER)

    async with trio.open_nursery() as nursery:
        await nursery.start(Broadcaster(settings, outbox_recv).run)
        await nursery.start(Chunker(settings, speech_recv, outbox_send.clone()).run)
        await nursery.start(Router(settings, providers, commands_recv, speech_send).run)
        port = await nursery.start(Intake(settings, commands_send, outbox_send).run)
        log.info("daemon.started", version=__version__, host=settings.host, port=port, provider=settings.provider)
        task_status.started(RunningDaemon(port=port, settings=settings))


@asynccontextmanager
async def running_daemon(settings: Settings, providers: ProviderSet | None = None) -> AsyncIterator[RunningDaemon]:
    """Start the daemon in the background for the block's duration (tests, embedding)."""
    async with trio.open_nursery() as nursery:
        daemon = await nursery.start(serve, settings, providers)
        try:
            yield daemon
        finally:
            nursery.cancel_scope.cancel()
