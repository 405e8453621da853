"""`speechcast serve` as a real subprocess, for the tests of what an operator sees: its
JSON log lines on stdout, its exit code, its answer to signals.

Loopback only, `--port 0 --http-port 0` (the ports are read from the `daemon.started`
line). Callers put `trio.fail_after` around every wait.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

# The console script installed next to this Python (the venv's `speechcast`).
SPEECHCAST = Path(sys.executable).with_name("speechcast")


class ServeProcess:
    """A running `speechcast serve`: read its log events, signal it, await its exit."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []  # every JSON log line read so far
        self.other_lines: list[str] = []  # anything else (a traceback, say), for messages
        self._buffer = bytearray()
        self.port = 0
        self.http_port = 0

    async def _line(self) -> str | None:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            data = await self.process.stdout.receive_some()
            if not data:
                return None
            self._buffer += data
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer[:] = rest
        return line.decode()

    async def next_event(self, name: str) -> dict[str, Any]:
        """Read log lines until one with `event == name`; fail if stdout ends first."""
        while (line := await self._line()) is not None:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                self.other_lines.append(line)
                continue
            self.events.append(event)
            if event.get("event") == name:
                return event
        raise AssertionError(f"no {name} before the daemon's stdout ended:\n" + "\n".join(self.other_lines))

    async def read_to_end(self) -> None:
        """Read the rest of stdout (the process has exited or is exiting)."""
        while (line := await self._line()) is not None:
            try:
                self.events.append(json.loads(line))
            except json.JSONDecodeError:
                self.other_lines.append(line)

    def logged(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def exit_code(self) -> int:
        await self.read_to_end()
        return await self.process.wait()


@asynccontextmanager
async def serve_process(*args: str, env: Mapping[str, str] | None = None) -> AsyncIterator[ServeProcess]:
    """Start `speechcast serve --port 0 --http-port 0 ARGS...` and wait for `daemon.started`.

    Resource handling: the process is killed on the way out if it is still running.
    `env` is added to a copy of this environment without any SPEECHCAST_* variable.
    """
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SPEECHCAST_")}
    environ.update(env or {})
    process = await trio.lowlevel.open_process(
        [str(SPEECHCAST), "serve", "--port", "0", "--http-port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=environ,
    )
    served = ServeProcess(process)
    try:
        started = await served.next_event("daemon.started")
        served.port, served.http_port = started["port"], started.get("http_port", 0)
        yield served
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()
