"""The daemon: the four actors in one nursery, joined by bounded memory channels, plus
the HTTP face, which enters the same pipeline through clones of the same channels.

    WS clients ─► intake ───┬─commands─► router ─speech─► chunker ─outbox─► broadcaster ─► subscribers
    HTTP ───────► http_face ┘
    (intake and http_face also put Join / Leave / their own error replies on the outbox)
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog
import trio

from actors.broadcaster import Broadcaster
from actors.chunker import Chunker
from actors.http_face import HttpFace
from actors.intake import Intake
from actors.router import Router
from pipeline import __version__
from pipeline.config import Settings
from pipeline.flow import Envelope, Outgoing, Shutdown, Speech
from pipeline.metrics import Metrics
from pipeline.providers.registry import ProviderSet, default_providers

log = structlog.get_logger()

# Channel sizes: enough to absorb a burst, small enough that backpressure is felt.
COMMAND_BUFFER = 64
SPEECH_BUFFER = 64
OUTBOX_BUFFER = 256
# Beyond shutdown_grace and two close_timeouts (deliver the queues, then the close
# handshake), a little slack before a graceful stop gives up waiting for connections.
STOP_SLACK_S = 1.0


@dataclass(frozen=True)
class RunningDaemon:
    """What a started daemon tells its caller."""

    port: int
    settings: Settings
    http_port: int


async def serve(
    settings: Settings,
    providers: ProviderSet | None = None,
    *,
    shutdown: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[RunningDaemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon; `task_status` reports once it is listening.

    When `shutdown()` returns (e.g. `shutdown=event.wait`), the daemon stops gracefully
    (see `_stop_gracefully`) and `serve` returns. Cancelling `serve` stops it at once.
    """
    providers = providers or default_providers(settings)
    commands_send, commands_recv = trio.open_memory_channel[Envelope | Shutdown](COMMAND_BUFFER)
    speech_send, speech_recv = trio.open_memory_channel[Speech](SPEECH_BUFFER)
    outbox_send, outbox_recv = trio.open_memory_channel[Outgoing](OUTBOX_BUFFER)

    metrics = Metrics()
    broadcaster = Broadcaster(settings, outbox_recv, metrics)
    # Cloned before intake takes the originals: each closes its own handles when it ends.
    http_commands = commands_send.clone()
    # The daemon's own handle on the router's channel, for the Shutdown step.
    control = commands_send.clone()
    stopping = trio.Event()

    async with trio.open_nursery() as nursery:
        await nursery.start(broadcaster.run)
        await nursery.start(Chunker(settings, speech_recv, outbox_send.clone()).run)
        await nursery.start(Router(settings, providers, commands_recv, speech_send, metrics).run)
        port = await nursery.start(Intake(settings, commands_send, outbox_send, stopping).run)
        http_face = HttpFace(
            settings,
            http_commands,
            status=broadcaster.status,
            providers=providers,
            metrics=metrics,
            ws_port=port,
            stopping=stopping,
        )
        http_port = await nursery.start(http_face.run)
        # What start-up built (the voice, the actors, the libraries) lives as long as the
        # process: keep it out of the cyclic collector, whose full passes otherwise pause
        # fan-out to thousands of subscribers (docs/fanout.md).
        gc.collect()
        gc.freeze()
        log.info(
            "daemon.started",
            version=__version__,
            host=settings.host,
            port=port,
            http_port=http_port,
            provider=settings.provider,
        )
        task_status.started(RunningDaemon(port=port, settings=settings, http_port=http_port))
        if shutdown is None:
            return  # runs until cancelled
        await shutdown()
        graceful = await _stop_gracefully(settings, stopping, control)
        nursery.cancel_scope.cancel()
    log.info("daemon.stopped", graceful=graceful)


async def _stop_gracefully(
    settings: Settings, stopping: trio.Event, control: trio.MemorySendChannel[Envelope | Shutdown]
) -> bool:
    """Stop as DESIGN.md section 3 says: intake refuses new handshakes (503) and commands
    (`not_initialized`); the router cancels the queued utterances and gives the speaking
    one `shutdown_grace` seconds; the broadcaster delivers what is queued and closes
    every WebSocket with 1001.

    Error handling: returns False when connections were still open after the bound
    (grace + 2 x close_timeout + slack); the caller then stops anyway.
    """
    log.info("daemon.stopping", grace_s=settings.shutdown_grace)
    stopping.set()
    done = trio.Event()
    with trio.move_on_after(settings.shutdown_grace + 2 * settings.close_timeout + STOP_SLACK_S):
        async with control:
            await control.send(Shutdown(settings.shutdown_grace, done))
        await done.wait()
    return done.is_set()


@asynccontextmanager
async def running_daemon(settings: Settings, providers: ProviderSet | None = None) -> AsyncIterator[RunningDaemon]:
    """Start the daemon in the background for the block's duration (tests, embedding)."""
    async with trio.open_nursery() as nursery:
        daemon = await nursery.start(serve, settings, providers)
        try:
            yield daemon
        finally:
            nursery.cancel_scope.cancel()
