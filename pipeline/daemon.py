"""The daemon: the four actors in one nursery, joined by bounded memory channels, plus
the HTTP face, which enters the same pipeline through a clone of the commands channel.

    WS clients ─► intake ───┬─commands─► router ─speech─► chunker ─outbox─► broadcaster ─► subscribers
    HTTP ───────► http_face ┘    │                                              ▲
                     ▲           └── HTTP answers (a channel in each Envelope)  │
                     └── status: the router's last published SessionStatus ────┘
    (intake also puts Join / Leave and its own error replies on the outbox)

With `broker` set, pipeline/broker/scale_out.py takes the router's and the chunker's place:
commands go to the broker, the broadcaster is fed from it, and the router and chunker run
on whichever daemon holds the speaker lease (docs/scale-out.md).

The daemon owns the one drain sequence of a graceful stop (`_drain`).
"""

from __future__ import annotations

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

    When `shutdown()` returns (e.g. `shutdown=event.wait`), the daemon drains (`_drain`)
    and `serve` returns. Cancelling `serve` stops it at once.
    """
    providers = providers or default_providers(settings)
    commands_send, commands_recv = trio.open_memory_channel[Envelope | Shutdown](COMMAND_BUFFER)
    speech_send, speech_recv = trio.open_memory_channel[Speech](SPEECH_BUFFER)
    outbox_send, outbox_recv = trio.open_memory_channel[Outgoing](OUTBOX_BUFFER)

    metrics = Metrics()
    broadcaster = Broadcaster(settings, outbox_recv, metrics)
    # Cloned before intake takes the originals: each closes its own handles when it ends.
    http_commands = commands_send.clone()
    # The daemon's own handle on the router's channel, for the drain's Shutdown step.
    control = commands_send.clone()

    async with trio.open_nursery() as nursery:
        await nursery.start(broadcaster.run)
        cluster = None
        if settings.broker:
            # Several daemons, one audience: the router and chunker run on whichever daemon
            # holds the broker's lease (docs/scale-out.md). Imported only here, so a daemon
            # alone never loads the Redis client.
            from pipeline.broker.scale_out import ScaleOut

            cluster = ScaleOut(settings, providers, commands_recv, outbox_send.clone(), metrics)
            await nursery.start(cluster.run)
        else:
            await nursery.start(Chunker(settings, speech_recv, outbox_send.clone()).run)
            await nursery.start(Router(settings, providers, commands_recv, speech_send, metrics).run)
        intake = Intake(settings, commands_send, outbox_send, first_conn_id=cluster.conn_id_base + 1 if cluster else 1)
        port = await nursery.start(intake.run)
        http_face = HttpFace(
            settings,
            http_commands,
            status=broadcaster.status,
            providers=providers,
            metrics=metrics,
            ws_port=port,
            cluster=cluster,
        )
        http_port = await nursery.start(http_face.run)
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
        graceful = await _drain(settings, intake, http_face, control)
        nursery.cancel_scope.cancel()
    log.info("daemon.stopped", graceful=graceful)


async def _drain(
    settings: Settings, intake: Intake, http_face: HttpFace, control: trio.MemorySendChannel[Envelope | Shutdown]
) -> bool:
    """Stop as DESIGN.md section 3 says, one step after the other, each within its bound:

    1. stop accepting: new handshakes get 503, commands `not_initialized`, /readyz 503;
    2. the router ends every queued utterance as `cancelled` and gives the speaking one
       `shutdown_grace` seconds; its Shutdown mark then follows the last audio down the
       pipeline (bound: grace + slack);
    3. on that mark the broadcaster delivers what each subscriber has queued and closes it
       with 1001 (bound: 2 x close_timeout + slack: delivery, then the close handshake);
    4. hypercorn stops through its shutdown trigger, letting requests in flight finish
       (bound: close_timeout + slack).

    Error handling: a step that overruns its bound is given up and the next one starts;
    returns False if any did (the caller stops anyway).
    """
    log.info("daemon.stopping", grace_s=settings.shutdown_grace)
    intake.stop_accepting()
    http_face.stop_accepting()
    shutdown = Shutdown(settings.shutdown_grace)
    async with control:
        await control.send(shutdown)
    steps = (
        (shutdown.spoken.wait, settings.shutdown_grace + STOP_SLACK_S),
        (shutdown.closed.wait, 2 * settings.close_timeout + STOP_SLACK_S),
        (http_face.stop, settings.close_timeout + STOP_SLACK_S),
    )
    graceful = True
    for step, bound in steps:
        with trio.move_on_after(bound) as overrun:
            await step()
        graceful = graceful and not overrun.cancelled_caught
    return graceful


@asynccontextmanager
async def running_daemon(settings: Settings, providers: ProviderSet | None = None) -> AsyncIterator[RunningDaemon]:
    """Start the daemon in the background for the block's duration (tests, embedding)."""
    async with trio.open_nursery() as nursery:
        daemon = await nursery.start(serve, settings, providers)
        try:
            yield daemon
        finally:
            nursery.cancel_scope.cancel()
