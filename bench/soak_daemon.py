"""One `speechcast serve` as a real subprocess for the soak run: started on loopback with
`--port 0 --http-port 0` (the ports come from its `daemon.started` log line), its log drained
to a file the whole time (a full stdout pipe would freeze the daemon), and its memory read
from /proc (the daemon and, separately, every process below it: worker processes).

    async with daemon_process(["--stall-timeout", "1"], env, log_path) as daemon:
        daemon.port, daemon.http_port, daemon.rss_kib(), daemon.children_rss_kib()
        daemon.counts["subscriber.too_slow"], daemon.stray_lines   # what the log said
        daemon.process.send_signal(signal.SIGTERM); await daemon.process.wait()
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

# The console script installed next to this Python (the venv's `speechcast`).
SPEECHCAST = Path(sys.executable).with_name("speechcast")
# Non-JSON lines kept for the report (a traceback, say); the whole log is in the file.
STRAY_LINES_KEPT = 40


def rss_kib(pid: int) -> int:
    """Resident memory of one process (VmRSS, KiB); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children...), from the ppid in /proc/*/stat."""
    parents: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # The command name may hold spaces and parentheses: split after the last ")".
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        parents[ppid].append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


class DaemonProcess:
    """A running daemon: its ports, its memory, and counts of what it logged."""

    def __init__(self, process: trio.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.port = 0
        self.http_port = 0
        self.counts: collections.Counter[str] = collections.Counter()  # log lines per event name
        self.levels: collections.Counter[str] = collections.Counter()  # log lines per level
        self.stray_lines: collections.deque[str] = collections.deque(maxlen=STRAY_LINES_KEPT)
        self._started = trio.Event()
        self._started_line: dict | None = None

    def rss_kib(self) -> int:
        return rss_kib(self.process.pid)

    def children_rss_kib(self) -> tuple[int, int]:
        """(how many processes below the daemon, their summed RSS in KiB)."""
        pids = descendants(self.process.pid)
        return len(pids), sum(rss_kib(p) for p in pids)

    def _note(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            self.stray_lines.append(line.decode(errors="replace"))
            return
        self.counts[str(event.get("event"))] += 1
        self.levels[str(event.get("level"))] += 1
        if event.get("event") == "daemon.started" and not self._started.is_set():
            self._started_line = event
            self._started.set()

    async def drain(self) -> None:
        """Read stdout to its end, line by line, into the log file and the counters."""
        assert self.process.stdout is not None
        buffer = bytearray()
        with open(self.log_path, "wb") as log:
            while data := await self.process.stdout.receive_some(65536):
                log.write(data)
                buffer += data
                *lines, rest = bytes(buffer).split(b"\n")
                buffer[:] = rest
                for line in lines:
                    self._note(line)
        if buffer:
            self._note(bytes(buffer))
        self._started.set()  # wake a waiter: the daemon ended before it started


@asynccontextmanager
async def daemon_process(args: Sequence[str], env: Mapping[str, str], log_path: Path,
                         start_timeout: float = 60.0) -> AsyncIterator[DaemonProcess]:
    """Start `speechcast serve --port 0 --http-port 0 ARGS...` and wait for `daemon.started`.

    `env` is added to a copy of this environment without any SPEECHCAST_* variable.
    Resource handling: the log is drained until the process's stdout ends; the process is
    killed on the way out if it is still running.
    Error handling: RuntimeError if the daemon exits or is silent for `start_timeout` s
    before it logs `daemon.started`.
    """
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SPEECHCAST_")}
    environ.update(env)
    process = await trio.lowlevel.open_process(
        [str(SPEECHCAST), "serve", "--port", "0", "--http-port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environ)
    daemon = DaemonProcess(process, log_path)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon.drain)
            with trio.move_on_after(start_timeout):
                await daemon._started.wait()
            if daemon._started_line is None:
                raise RuntimeError(f"the daemon did not start; see {log_path}")
            daemon.port = daemon._started_line["port"]
            daemon.http_port = daemon._started_line.get("http_port", 0)
            yield daemon
            # The drain task ends with the daemon's stdout: give it a moment to read the last
            # lines of a daemon that exited (a worker still holding the pipe may keep it open).
            nursery.cancel_scope.deadline = trio.current_time() + (5 if process.returncode is not None else 0)
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
