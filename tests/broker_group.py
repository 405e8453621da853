"""A real Redis server and a group of `speechcast serve --broker ...` subprocesses, for
the scale-out tests (tests/test_scale_out.py) and the scale-out benchmark.

Redis is Debian's `redis-server` on a free loopback port, without persistence (so a
restart is a broker that lost everything, the harder case). Each daemon's log is read
in the background (a full stdout pipe would stall it), and a test waits for a log event
with `await daemon.wait_for(...)` (an event, not a sleep). Callers put `trio.fail_after`
around every wait.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

SPEECHCAST = Path(sys.executable).with_name("speechcast")
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    """A loopback port nobody listens on now (Redis takes no port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process on `port`; `stop()` kills it, `start()` starts it again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.process = await trio.lowlevel.open_process(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.process.stdout is not None
        seen = b""
        while b"Ready to accept connections" not in seen:
            data = await self.process.stdout.receive_some()
            if not data:
                raise AssertionError(f"redis-server did not start:\n{seen.decode(errors='replace')}")
            seen = seen[-200:] + data

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            with trio.CancelScope(shield=True):
                await self.process.wait()
        if self.process is not None and self.process.stdout is not None:
            with trio.CancelScope(shield=True):
                await self.process.stdout.aclose()
        self.process = None


@dataclass
class Daemon:
    """One daemon of the group, its log read as it comes."""

    process: trio.Process
    port: int = 0
    http_port: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def ws(self, query: str = "") -> str:
        return f"ws://127.0.0.1:{self.port}/{query}"

    async def read_log(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self.process.stdout is not None
        buffer = b""
        started = False
        while data := await self.process.stdout.receive_some():
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                try:
                    event = json.loads(line)
                except ValueError:
                    event = {"event": "(not json)", "line": line.decode(errors="replace")}
                self.events.append(event)
                if event.get("event") == "daemon.started" and not started:
                    self.port, self.http_port, started = event["port"], event["http_port"], True
                    task_status.started()
            self._changed.set()
            self._changed = trio.Event()
        self._changed.set()
        if not started:
            raise AssertionError("the daemon ended before it started:\n" + "\n".join(map(str, self.events[-20:])))

    def logged(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    async def wait_for(self, name: str, where: Callable[[dict[str, Any]], bool] = lambda e: True) -> dict[str, Any]:
        """The first log event `name` (matching `where`), waiting for it if need be."""
        while True:
            for event in self.logged(name):
                if where(event):
                    return event
            if self.process.returncode is not None and not self.process.stdout:
                raise AssertionError(f"the daemon exited without logging {name}")
            await self._changed.wait()

    async def info(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as http:
            return dict((await http.get(self.http + "/v1/info")).json())

    async def ready(self) -> int:
        async with httpx.AsyncClient() as http:
            return (await http.get(self.http + "/readyz")).status_code

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)


@asynccontextmanager
async def daemon_group(
    redis_url: str, count: int, *args: str, env: Mapping[str, str] | None = None
) -> AsyncIterator[list[Daemon]]:
    """`count` daemons sharing `redis_url`, each `serve --port 0 --http-port 0 ARGS`.

    Resource handling: every process still running is killed on the way out.
    """
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SPEECHCAST_")}
    environ.update(env or {})
    daemons: list[Daemon] = []
    async with trio.open_nursery() as nursery:
        try:
            for _ in range(count):
                process = await trio.lowlevel.open_process(
                    [str(SPEECHCAST), "serve", "--port", "0", "--http-port", "0", "--broker", redis_url, *args],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=environ,
                )
                daemon = Daemon(process)
                daemons.append(daemon)
                await nursery.start(daemon.read_log)
            yield daemons
        finally:
            for daemon in daemons:
                if daemon.process.returncode is None:
                    daemon.process.kill()
            with trio.CancelScope(shield=True):
                for daemon in daemons:
                    await daemon.process.wait()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def redis_server() -> AsyncIterator[RedisServer]:
    server = RedisServer(free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def took_over(daemons: list[Daemon]) -> int:
    """How many terms as speaker the group has begun so far."""
    return sum(len(d.logged("speaker.took_over")) for d in daemons)


async def next_speaker(daemons: list[Daemon], terms_before: int) -> Daemon:
    """The daemon that begins the group's next term (after `terms_before` terms in all)."""
    while took_over(daemons) <= terms_before:
        async with trio.open_nursery() as nursery:
            for daemon in daemons:

                async def wake(event: trio.Event = daemon._changed) -> None:
                    await event.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(wake)
    return max(daemons, key=lambda d: max((e["timestamp"] for e in d.logged("speaker.took_over")), default=""))
