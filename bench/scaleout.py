"""Scale-out through Redis (docs/scale-out.md), measured against one daemon in the same
run: 3 daemons sharing a Redis server, 600 subscribers on each, against 1 daemon alone
with all 1800 subscribers.

The stream is bench/fanout.py's (a paced provider whose PCM carries the time each chunk
is due, so lag = due → received, the broker's hop included), and so are the subscribers
(asyncio + `websockets`, in this process). Reported per setup: lag p50/p99 over every
chunk every subscriber received, frames lost (target 0), slow closes, the CPU of each
daemon and of redis-server while streaming (% of one core, from /proc), and the bytes
that crossed the broker (Redis's own in/out counters) per second of speech.

    python -m bench scaleout
    python -m bench.scaleout --daemons 3 --per-daemon 600 --rate 10 --seconds 8
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
from websockets.asyncio.client import connect

from bench import fanout_servers
from bench.machine import describe
from bench.fanout import (
    CONNECT_PARALLEL,
    SETTLE_SECONDS,
    Listener,
    listen,
    own_cpu_seconds,
    process_cpu_seconds,
    raise_open_files_limit,
)


@dataclass
class Setup:
    name: str
    daemons: int
    subscribers: int  # in all
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    lost: int = 0
    slow_closed: int = 0
    daemon_cpu: tuple[float, ...] = ()
    redis_cpu: float | None = None
    broker_bytes_per_speech_s: float | None = None
    client_cpu: float = 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis() -> tuple[subprocess.Popen[bytes], int]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server; `make bench` does it)")
    port = free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    seen = b""
    while b"Ready to accept connections" not in seen:
        line = process.stdout.readline()
        if not line:
            raise SystemExit(f"redis-server did not start: {seen.decode(errors='replace')}")
        seen += line
    return process, port


def redis_net_bytes(port: int) -> int:
    import redis

    stats = redis.Redis(port=port).info("stats")
    return int(stats["total_net_input_bytes"]) + int(stats["total_net_output_bytes"])


def start_daemons(count: int, frames: int, rate: float, broker: str | None) -> list[tuple[multiprocessing.Process, int]]:
    context = multiprocessing.get_context("spawn")
    started = []
    for _ in range(count):
        parent, child = context.Pipe()
        process = context.Process(target=fanout_servers.run_daemon, args=(child, frames, rate, broker), daemon=True)
        process.start()
        deadline = time.monotonic() + 60
        while not parent.poll(0.2):
            if not process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("a daemon did not start (see above)")
        started.append((process, parent.recv()))
    return started


async def measure(setup: Setup, ports: list[int], pids: list[int], frames: int, rate: float,
                  redis: tuple[int, int] | None) -> None:
    """`setup.subscribers` spread evenly over `ports`; one stream asked of the first."""
    gate = asyncio.Semaphore(CONNECT_PARALLEL)
    listeners = [Listener() for _ in range(setup.subscribers)]
    sockets, tasks = [], []

    async def open_one(index: int, listener: Listener) -> None:
        async with gate:
            port = ports[index % len(ports)]
            ws = await connect(f"ws://127.0.0.1:{port}/", compression=None, max_size=2**20, open_timeout=60)
            ready = asyncio.Event()
            sockets.append(ws)
            tasks.append(asyncio.create_task(listen(ws, listener, ready)))
            await ready.wait()

    await asyncio.gather(*(open_one(i, listener) for i, listener in enumerate(listeners)))
    await asyncio.sleep(SETTLE_SECONDS)
    async with connect(f"ws://127.0.0.1:{ports[-1]}/?subscribe=0", compression=None) as control:
        cpu_before = [process_cpu_seconds(pid) for pid in pids]
        redis_before = (process_cpu_seconds(redis[0]), redis_net_bytes(redis[1])) if redis else None
        own_before, wall_before = own_cpu_seconds(), time.monotonic()
        await control.send('{"type": "send_message", "text": "The scale-out benchmark stream."}')
        await asyncio.wait(tasks, timeout=frames / rate + 60)
        wall = time.monotonic() - wall_before
        setup.daemon_cpu = tuple((process_cpu_seconds(pid) - before) / wall * 100 for pid, before in zip(pids, cpu_before))
        setup.client_cpu = (own_cpu_seconds() - own_before) / wall * 100
        if redis and redis_before:
            setup.redis_cpu = (process_cpu_seconds(redis[0]) - redis_before[0]) / wall * 100
            speech_s = frames * fanout_servers.CHUNK_MS / 1000
            setup.broker_bytes_per_speech_s = (redis_net_bytes(redis[1]) - redis_before[1]) / speech_s
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    for task in tasks:
        task.cancel()
    lags = np.fromiter((lag for listener in listeners for lag in listener.lags_ns), dtype=np.int64)
    setup.p50_ms = float(np.percentile(lags, 50)) / 1e6 if lags.size else float("nan")
    setup.p99_ms = float(np.percentile(lags, 99)) / 1e6 if lags.size else float("nan")
    setup.lost = sum(frames - len(set(listener.chunk_ids)) for listener in listeners)
    setup.slow_closed = sum(listener.close_code == 1013 for listener in listeners)


def run(setup: Setup, frames: int, rate: float) -> Setup:
    redis_process, redis_port = start_redis() if setup.daemons > 1 else (None, 0)
    broker = f"redis://127.0.0.1:{redis_port}/0" if redis_process else None
    daemons = []
    try:
        daemons = start_daemons(setup.daemons, frames, rate, broker)
        ports = [port for _, port in daemons]
        pids = [process.pid for process, _ in daemons if process.pid is not None]
        redis = (redis_process.pid, redis_port) if redis_process else None
        asyncio.run(measure(setup, ports, pids, frames, rate, redis))
        return setup
    finally:
        for process, _ in daemons:
            process.terminate()
            process.join(10)
        if redis_process is not None:
            redis_process.kill()
            redis_process.wait()


def print_table(results: list[Setup], frames: int, rate: float) -> None:
    print(f"\nscale-out: {frames} chunks of {fanout_servers.CHUNK_MS} ms at {rate:g}/s; "
          f"{describe()}")
    print("lag = chunk due -> received; cpu = % of one core while streaming; broker = Redis bytes in+out per s of speech\n")
    header = (f"{'setup':<24} | {'p50':>7} {'p99':>7} {'lost':>5} {'slow':>4} | {'cpu per daemon':<20} "
              f"{'redis':>6} | {'broker/s speech':>15} | {'client':>6}")
    print(header)
    print("-" * len(header))
    for r in results:
        daemons = " ".join(f"{c:.0f}%" for c in r.daemon_cpu)
        redis_cpu = f"{r.redis_cpu:.0f}%" if r.redis_cpu is not None else "-"
        broker = f"{r.broker_bytes_per_speech_s / 1024:.0f} KiB" if r.broker_bytes_per_speech_s else "-"
        print(f"{r.name:<24} | {r.p50_ms:>5.1f}ms {r.p99_ms:>5.1f}ms {r.lost:>5} {r.slow_closed:>4} | {daemons:<20} "
              f"{redis_cpu:>6} | {broker:>15} | {r.client_cpu:>5.0f}%")
    if len(results) == 2 and results[1].p99_ms:
        group, alone = results
        print(f"\np99 ratio (group / alone): {group.p99_ms / alone.p99_ms:.2f}; busiest daemon's CPU ratio: "
              f"{max(group.daemon_cpu) / max(alone.daemon_cpu):.2f}; frames lost: {group.lost} / {alone.lost} (target 0)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--daemons", type=int, default=3, help="daemons sharing the broker")
    parser.add_argument("--per-daemon", type=int, default=600, help="subscribers on each of them")
    parser.add_argument("--rate", type=float, default=10.0, help="chunks per second (5 = real time for 200 ms chunks)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the stream in seconds")
    args = parser.parse_args(argv or [])
    frames = max(2, round(args.rate * args.seconds))
    total = args.daemons * args.per_daemon
    raise_open_files_limit(2 * total + 256)
    results = []
    for setup in (Setup(f"{args.daemons} daemons x {args.per_daemon} + Redis", args.daemons, total),
                  Setup(f"1 daemon x {total}", 1, total)):
        result = run(setup, frames, args.rate)
        print(f"  {result.name}: p99 {result.p99_ms:.1f} ms, lost {result.lost}", flush=True)
        results.append(result)
    print_table(results, frames, args.rate)


if __name__ == "__main__":
    main(sys.argv[1:])
