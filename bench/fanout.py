"""Fan-out at scale: N WebSocket subscribers receive one continuous audio stream from the
daemon, and, in the same run, from a minimal reference broadcaster built on the
`websockets` library's own `broadcast()` (bench/fanout_servers.py).

Each server runs in its own process; the N subscribers run here, in this process, on
asyncio with the `websockets` client. Every chunk's PCM carries the time it was due to
be broadcast (CLOCK_MONOTONIC, shared by all processes), so a subscriber's lag is
"due to be broadcast → received", including any lateness of the server. For each N it
reports lag p50/p99 over every chunk received by every subscriber, frames lost, slow
disconnects (close 1013), the server's CPU while streaming (from /proc, in % of one
core) and this client process's CPU (both share the machine's cores). Target: 1000
subscribers with p99 under 100 ms, nothing lost, at least the reference's capacity.

In the same run, at `--opus-counts` (1000 and 2000), the daemon again with every
subscriber on `format=opus`: an opus frame carries no readable stamp, so one extra
`format=pcm` subscriber (not counted) tells each chunk id's due time. Target: p99 with
opus no worse than with wav.

    python -m bench fanout                      # the defaults below
    python -m bench.fanout --counts 100,1000 --rate 10 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import multiprocessing
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from bench import fanout_servers
from bench.machine import describe

COUNTS = (100, 500, 1000, 2000)
OPUS_COUNTS = (1000, 2000)
# Chunk id at byte 4 of a frame; the stamp at the start of the PCM, after the 9-byte
# frame header and the 44-byte WAV header.
CHUNK_ID = struct.Struct("<I")
STAMP_OFFSET = 9 + 44
PCM_STAMP_OFFSET = 9  # format=pcm: no WAV header
# Connections opened at once while setting up (a burst of thousands only measures the
# accept backlog).
CONNECT_PARALLEL = 100
TARGET_P99_MS = 100.0
# Pause between the last join and the stream. Joins are not what is measured: at 2000
# connections the daemon's full garbage collections, triggered as its heap grows with
# the joins, take ~0.2 s, and the last one would otherwise land on the first chunks.
SETTLE_SECONDS = 1.0


@dataclass
class Listener:
    """What one subscriber saw."""

    lags_ns: list[int] = field(default_factory=list)
    chunk_ids: list[int] = field(default_factory=list)
    received_ns: list[int] = field(default_factory=list)  # format=opus: lags come from the witness
    stamps: dict[int, int] = field(default_factory=dict)  # the witness: chunk id -> due time
    bytes: int = 0
    close_code: int | None = None
    finished: bool = False


@dataclass
class RunResult:
    server: str
    subscribers: int
    p50_ms: float
    p99_ms: float
    lost: int
    slow_closed: int
    server_cpu: float  # % of one core while streaming
    client_cpu: float
    bytes_per_chunk: float = 0.0  # VOICE_DATA bytes one subscriber received per chunk

    @property
    def meets_target(self) -> bool:
        return self.p99_ms < TARGET_P99_MS and self.lost == 0 and self.slow_closed == 0


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def listen(ws, listener: Listener, ready: asyncio.Event, stamp_at: int | None = STAMP_OFFSET) -> None:
    """Record every chunk's lag (its stamp at `stamp_at`; None: its arrival time only)
    and id until the end-of-stream event or a close."""
    try:
        async for message in ws:
            if isinstance(message, bytes):
                now = time.monotonic_ns()
                chunk_id = CHUNK_ID.unpack_from(message, 4)[0]
                listener.bytes += len(message)
                if stamp_at is None:
                    listener.received_ns.append(now)
                else:
                    stamp = int.from_bytes(message[stamp_at : stamp_at + 8], "little")
                    listener.lags_ns.append(now - stamp)
                    listener.stamps[chunk_id] = stamp
                listener.chunk_ids.append(chunk_id)
            elif '"utterance_finished"' in message:
                listener.finished = True
                return
            elif '"hello"' in message:
                ready.set()
    except ConnectionClosed as e:
        listener.close_code = e.rcvd.code if e.rcvd is not None else 1006


async def measure(server: str, port: int, pid: int, count: int, frames: int, seconds: float) -> RunResult:
    """Connect `count` subscribers, ask for one stream, and collect what they saw."""
    base = f"ws://127.0.0.1:{port}"
    gate = asyncio.Semaphore(CONNECT_PARALLEL)
    listeners = [Listener() for _ in range(count)]
    opus = server == "daemon-opus"
    witness = Listener()  # format=opus only: the due time of each chunk id
    sockets = []
    tasks = []

    async def open_one(listener: Listener, path: str, stamp_at: int | None) -> None:
        async with gate:
            ws = await connect(base + path, compression=None, max_size=2**20, open_timeout=30)
            ready = asyncio.Event()
            sockets.append(ws)
            tasks.append(asyncio.create_task(listen(ws, listener, ready, stamp_at)))
            await ready.wait()

    if opus:
        await open_one(witness, "/?format=pcm", PCM_STAMP_OFFSET)
    path, stamp_at = ("/?format=opus", None) if opus else ("/", STAMP_OFFSET)
    await asyncio.gather(*(open_one(listener, path, stamp_at) for listener in listeners))
    await asyncio.sleep(SETTLE_SECONDS)
    control_path = "/control" if server == "reference" else "/?subscribe=0"
    async with connect(base + control_path, compression=None) as control:
        cpu_before, own_before, wall_before = process_cpu_seconds(pid), own_cpu_seconds(), time.monotonic()
        await control.send('{"type": "send_message", "text": "The fan-out benchmark stream."}')
        await asyncio.wait(tasks, timeout=seconds + 60)
        wall = time.monotonic() - wall_before
        server_cpu = (process_cpu_seconds(pid) - cpu_before) / wall * 100
        client_cpu = (own_cpu_seconds() - own_before) / wall * 100
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    for task in tasks:
        task.cancel()

    if opus:
        for listener in listeners:
            listener.lags_ns = [
                now - witness.stamps[chunk_id]
                for chunk_id, now in zip(listener.chunk_ids, listener.received_ns)
                if chunk_id in witness.stamps
            ]
    lags = np.fromiter((lag for listener in listeners for lag in listener.lags_ns), dtype=np.int64)
    received = sum(len(listener.chunk_ids) for listener in listeners)
    lost = sum(frames - len(set(listener.chunk_ids)) for listener in listeners)
    return RunResult(
        server=server,
        subscribers=count,
        p50_ms=float(np.percentile(lags, 50)) / 1e6 if lags.size else float("nan"),
        p99_ms=float(np.percentile(lags, 99)) / 1e6 if lags.size else float("nan"),
        lost=lost,
        slow_closed=sum(listener.close_code == 1013 for listener in listeners),
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        bytes_per_chunk=sum(listener.bytes for listener in listeners) / received if received else 0.0,
    )


def run_one(server: str, count: int, frames: int, rate: float, baseline: str | None = None) -> RunResult:
    """Start the server in its own process, measure it, and stop it. The "baseline"
    server is the daemon of another source tree (`baseline`, see `export_tree`)."""
    target = fanout_servers.run_reference if server == "reference" else fanout_servers.run_daemon
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=target, args=(child, frames, rate), daemon=True)
    saved_path = list(sys.path)
    if server == "baseline" and baseline is not None:
        # A spawned child starts from the parent's sys.path, so it imports `bench` and
        # `pipeline` from that tree: the old daemon with the old bench's entry point.
        sys.path.insert(0, baseline)
    try:
        process.start()
    finally:
        sys.path[:] = saved_path
    try:
        started = time.monotonic()
        while not parent.poll(0.2):
            if not process.is_alive() or time.monotonic() - started > 60:
                raise RuntimeError(f"the {server} did not start (see above)")
        port = parent.recv()
        return asyncio.run(measure(server, port, process.pid, count, frames, frames / rate))
    finally:
        process.terminate()
        process.join(10)


def raise_open_files_limit(needed: int) -> None:
    """Each subscriber is two descriptors on this machine (both ends on loopback)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < needed:
        raise SystemExit(f"open-files limit is {soft}, {needed} needed; raise the hard limit (ulimit -Hn)")


def capacity(results: list[RunResult]) -> int:
    """The largest N (in a row from the smallest) that met the target."""
    best = 0
    for result in sorted(results, key=lambda r: r.subscribers):
        if not result.meets_target:
            break
        best = result.subscribers
    return best


def print_table(results: list[RunResult], rate: float, frames: int) -> None:
    print(f"\nfan-out: {frames} chunks of {fanout_servers.CHUNK_MS} ms ({fanout_servers.CHUNK_BYTES + 53} bytes) "
          f"at {rate:g}/s per subscriber; {describe()}")
    print("lag = chunk due to be broadcast -> received; cpu = % of one core while streaming\n")
    by_key = {(r.server, r.subscribers): r for r in results}
    print_opus(by_key)
    header = (f"{'N':>5} | {'daemon p50':>10} {'p99':>7} {'lost':>5} {'slow':>4} {'cpu':>5} {'client':>6} | "
              f"{'ref p50':>8} {'p99':>7} {'lost':>5} {'cpu':>5} {'client':>6} | {'p99 ratio':>9} {'cpu ratio':>9}")
    print(header)
    print("-" * len(header))
    for count in sorted({r.subscribers for r in results if r.server == "reference"}):
        d, ref = by_key[("daemon", count)], by_key[("reference", count)]
        print(
            f"{count:>5} | {d.p50_ms:>8.1f}ms {d.p99_ms:>5.1f}ms {d.lost:>5} {d.slow_closed:>4} {d.server_cpu:>4.0f}% "
            f"{d.client_cpu:>5.0f}% | {ref.p50_ms:>6.1f}ms {ref.p99_ms:>5.1f}ms {ref.lost:>5} {ref.server_cpu:>4.0f}% "
            f"{ref.client_cpu:>5.0f}% | {d.p99_ms / ref.p99_ms:>9.2f} {d.server_cpu / ref.server_cpu:>9.2f}"
        )
    daemon_cap = capacity([r for r in results if r.server == "daemon"])
    reference_cap = capacity([r for r in results if r.server == "reference"])
    print(f"\ncapacity (largest N with p99 < {TARGET_P99_MS:g} ms, nothing lost): daemon {daemon_cap}, "
          f"reference {reference_cap}; target: 1000 and at least the reference -> "
          f"{'met' if daemon_cap >= max(1000, reference_cap) else 'NOT met'}")


def print_opus(by_key: dict[tuple[str, int], RunResult]) -> None:
    """The daemon with every subscriber on format=wav against format=opus, same run."""
    counts = sorted(n for server, n in by_key if server == "daemon-opus" and ("daemon", n) in by_key)
    if not counts:
        return
    print("format=wav against format=opus (the daemon, same run; bytes = one subscriber's per chunk):\n")
    header = (f"{'N':>5} | {'wav p50':>8} {'p99':>7} {'lost':>4} {'cpu':>5} {'bytes':>6} | "
              f"{'opus p50':>8} {'p99':>7} {'lost':>4} {'cpu':>5} {'bytes':>6} | {'p99 ratio':>9} {'cpu ratio':>9}")
    print(header)
    print("-" * len(header))
    for count in counts:
        w, o = by_key[("daemon", count)], by_key[("daemon-opus", count)]
        print(f"{count:>5} | {w.p50_ms:>6.1f}ms {w.p99_ms:>5.1f}ms {w.lost:>4} {w.server_cpu:>4.0f}% {w.bytes_per_chunk:>6.0f} | "
              f"{o.p50_ms:>6.1f}ms {o.p99_ms:>5.1f}ms {o.lost:>4} {o.server_cpu:>4.0f}% {o.bytes_per_chunk:>6.0f} | "
              f"{o.p99_ms / w.p99_ms:>9.2f} {o.server_cpu / w.server_cpu:>9.2f}")
    worse = [n for n in counts if by_key[("daemon-opus", n)].p99_ms > by_key[("daemon", n)].p99_ms]
    print(f"\ntarget: opus p99 no worse than wav -> {'met' if not worse else 'NOT met at N=' + ','.join(map(str, worse))}\n")


def export_tree(ref: str) -> str:
    """The project's files at git `ref`, in a temporary folder (removed at exit)."""
    folder = tempfile.mkdtemp(prefix="speechcast-baseline-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    archive = subprocess.run(["git", "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def print_before_after(results: list[RunResult], ref: str) -> None:
    """The daemon of this tree against the daemon at `ref`, measured in the same run."""
    print(f"\nbefore ({ref}) / after (this tree), same run:\n")
    header = f"{'N':>5} | {'before p99':>10} {'cpu':>5} | {'after p99':>9} {'cpu':>5} | {'p99 ratio':>9} {'cpu ratio':>9}"
    print(header)
    print("-" * len(header))
    by_key = {(r.server, r.subscribers): r for r in results}
    for count in sorted({r.subscribers for r in results}):
        before, after = by_key.get(("baseline", count)), by_key.get(("daemon", count))
        if before is None or after is None:
            continue
        print(f"{count:>5} | {before.p99_ms:>8.1f}ms {before.server_cpu:>4.0f}% | {after.p99_ms:>7.1f}ms "
              f"{after.server_cpu:>4.0f}% | {after.p99_ms / before.p99_ms:>9.2f} {after.server_cpu / before.server_cpu:>9.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default=",".join(map(str, COUNTS)), help="subscriber counts, comma-separated")
    parser.add_argument("--rate", type=float, default=10.0, help="chunks per second (5 = real time for 200 ms chunks)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each stream in seconds")
    parser.add_argument("--only", choices=("daemon", "reference", "daemon-opus"), help="measure one server only")
    parser.add_argument("--opus-counts", default=",".join(map(str, OPUS_COUNTS)),
                        help="subscriber counts also measured with format=opus (empty: none)")
    parser.add_argument("--baseline", metavar="GIT_REF",
                        help="also measure the daemon as it was at this commit (before/after table)")
    args = parser.parse_args(argv or [])
    baseline = export_tree(args.baseline) if args.baseline else None
    counts = [int(c) for c in args.counts.split(",")]
    opus_counts = [int(c) for c in args.opus_counts.split(",") if c]
    frames = max(2, round(args.rate * args.seconds))
    raise_open_files_limit(2 * max(counts) + 256)
    results = []
    for count in sorted(set(counts) | set(opus_counts)):
        servers = ["baseline"] * bool(baseline) + ["daemon", "reference"] * (count in counts)
        servers += ["daemon-opus"] * (count in opus_counts)
        if count in opus_counts and count not in counts:
            servers.insert(0, "daemon")  # opus is compared with wav at the same N
        for server in servers:
            if args.only not in (None, server):
                continue
            result = run_one(server, count, frames, args.rate, baseline)
            print(f"  {server:>9} N={count:<5} p50 {result.p50_ms:7.1f} ms  p99 {result.p99_ms:7.1f} ms  "
                  f"lost {result.lost}  slow {result.slow_closed}  cpu {result.server_cpu:.0f}%", flush=True)
            results.append(result)
    if args.only is None:
        print_table([r for r in results if r.server in ("daemon", "reference", "daemon-opus")], args.rate, frames)
    if baseline:
        print_before_after(results, args.baseline)


if __name__ == "__main__":
    main(sys.argv[1:])
