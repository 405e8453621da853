"""`make soak`: one daemon, many minutes of random commands, churning subscribers and
provider faults, and a check that it keeps its promises (issue 10, "Keep it proven" d).

The daemon is a real `speechcast serve` subprocess (bench/soak_daemon.py) speaking with the
embedded voice and with a fake Kokoros server run here that misbehaves at random
(bench/soak_faults.py), with short timeouts so faults resolve quickly. Against it, from this
process (bench/soak_clients.py): control connections sending random valid and invalid
commands; healthy subscribers that must see one gap-free, well-formed stream
(bench/soak_checks.py); slow subscribers that should be dropped with 1013; subscribers that
vanish mid-stream; now and then a frame over the size limit. Every ~10 s a line of RSS and
counts. The load runs in two phases, warm-up then the rest; after each the load stops, the
queue drains and the daemon's RSS is read while it is idle, so the two figures that make the
growth compare like with like (RSS under load swings by ~100 MiB with what is queued). At the
end `/healthz` is asked, SIGTERM is sent, and a table is printed.

Targets: daemon RSS growth < 10 % from the end of the warm-up to the end, 0 frames lost by
healthy subscribers, 0 invariant violations, exit code 0 after SIGTERM. The exit status is
1 when one is missed.

    python -m bench.soak                     # 10 minutes
    python -m bench.soak --minutes 1 --healthy 10 --seed 7
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from bench import soak_clients, soak_faults
from bench.machine import describe
from bench.soak_clients import Control, Ledger
from bench.soak_daemon import DaemonProcess, daemon_process

RSS_GROWTH_TARGET = 10.0  # percent, end of warm-up to end
# Short provider timeouts so a stalled or failing fake is given up on in a second or two
# (the defaults are tuned for real servers: 15 s to first byte, 30 s breaker cooldown), and
# a small per-subscriber queue so slow subscribers reach it within seconds.
DAEMON_ARGS = (
    "--stall-timeout", "1", "--first-byte-timeout", "2", "--connect-timeout", "1",
    "--breaker-cooldown", "2", "--subscriber-queue-bytes", str(256 * 1024),
    "--shutdown-grace", "5",
)
SUBSCRIBER_VARIANTS = (("wav", False), ("pcm", False), ("wav", True), ("pcm", True))
COMMAND_INTERVAL = (0.3, 1.5)  # seconds between two commands of one control connection
SLOW_STALL = (4.0, 15.0)  # seconds a slow subscriber stops reading
MAX_SLOW, MAX_VANISHING = 4, 8  # of each at once
FAULT_HOLD = (5.0, 20.0)  # seconds a fault mode lasts
SIGTERM_WAIT = 30.0


@dataclass
class Sample:
    seconds: float
    rss_kib: int
    workers: int
    workers_rss_kib: int


@dataclass
class Run:
    """What the run measured; `targets_met` decides the exit status."""

    ledger: Ledger
    samples: list[Sample] = field(default_factory=list)
    warmup_rss_kib: int = 0
    end_rss_kib: int = 0
    fault_seconds: dict[str, float] = field(default_factory=dict)
    drained: bool = False
    healthz: int | None = None
    exit_code: int | None = None
    log_path: Path | None = None
    stray_lines: list[str] = field(default_factory=list)
    daemon_counts: dict[str, int] = field(default_factory=dict)

    @property
    def growth(self) -> float:
        return 100.0 * (self.end_rss_kib - self.warmup_rss_kib) / max(self.warmup_rss_kib, 1)

    @property
    def lost(self) -> int:
        checkers = self.ledger.checkers
        most = max((c.chunks for c in checkers), default=0)
        # Gaps a subscriber noticed, plus chunks another healthy subscriber got and it did not.
        return sum(c.lost for c in checkers) + sum(most - c.chunks for c in checkers)

    def targets_met(self) -> bool:
        return (self.growth < RSS_GROWTH_TARGET and self.lost == 0 and self.ledger.violations.count == 0
                and self.healthz == 200 and self.exit_code == 0)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the load (default 10)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds before the RSS baseline (default: a fifth of the run, at most 60)")
    parser.add_argument("--healthy", type=int, default=20, help="healthy subscribers (default 20)")
    parser.add_argument("--controls", type=int, default=3, help="control connections (default 3)")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between RSS lines (default 10)")
    parser.add_argument("--drain", type=float, default=60.0, help="longest wait for the queue to drain (s)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    parser.add_argument("--log", type=Path, default=None, help="where to write the daemon's log")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(60.0, args.minutes * 60 / 5)
    if args.seed is None:
        args.seed = int(time.time())
    return args


async def switch_faults(fake: soak_faults.FakeKokoros, rng: random.Random, run: Run, now: list[str]) -> None:
    """Move the fake Kokoros from one fault mode to another until cancelled."""
    weights = [m.weight for m in soak_faults.FAULT_MODES]
    while True:
        mode = rng.choices(soak_faults.FAULT_MODES, weights)[0]
        soak_faults.switch(fake, mode)
        now[0] = mode.name
        hold = rng.uniform(*FAULT_HOLD)
        run.fault_seconds[mode.name] = run.fault_seconds.get(mode.name, 0.0) + hold
        await trio.sleep(hold)


async def churn(port: int, url: str, rng: random.Random, ledger: Ledger) -> None:
    """Keep slow and vanishing subscribers coming and going (and an oversized frame now
    and then) until cancelled; at most MAX_SLOW and MAX_VANISHING at once."""
    slow_slots, vanishing_slots = trio.Semaphore(MAX_SLOW), trio.Semaphore(MAX_VANISHING)

    async def limited(slots: trio.Semaphore, job, *args) -> None:
        async with slots:
            await job(*args)

    async with trio.open_nursery() as nursery:
        while True:
            await trio.sleep(rng.uniform(0.1, 0.5))
            if vanishing_slots.value:
                nursery.start_soon(limited, vanishing_slots, soak_clients.vanishing, port, rng, ledger)
            if slow_slots.value and rng.random() < 0.15:
                nursery.start_soon(limited, slow_slots, soak_clients.slow, port, rng, ledger, SLOW_STALL)
            if rng.random() < 0.01:
                nursery.start_soon(soak_clients.oversized, url, ledger)


async def watch(daemon: DaemonProcess, ledger: Ledger, clients: trio.CancelScope) -> None:
    """End the run early if the daemon dies before SIGTERM: nothing more can be learned."""
    code = await daemon.process.wait()
    if not ledger.ending:
        ledger.violations.add("daemon_died", f"exit code {code} during the run; see the log")
        print(f"the daemon exited with {code} during the run", flush=True)
        clients.cancel()


def sample(daemon: DaemonProcess, started: float) -> Sample:
    workers, workers_rss = daemon.children_rss_kib()
    return Sample(time.monotonic() - started, daemon.rss_kib(), workers, workers_rss)


async def report_every(daemon: DaemonProcess, run: Run, started: float, every: float, fault: list[str]) -> None:
    """Print one line of RSS and progress every `every` seconds until cancelled."""
    ledger = run.ledger
    print(f"{'t(s)':>6} {'rss MiB':>8} {'workers':>8} {'accepted':>8} {'finished':>8} {'chunks':>7} "
          f"{'slow 1013':>9} {'vanished':>8} {'viol':>5}  fault", flush=True)
    while True:
        s = sample(daemon, started)
        run.samples.append(s)
        first = ledger.checkers[0] if ledger.checkers else None
        print(f"{s.seconds:6.0f} {s.rss_kib / 1024:8.1f} {s.workers:3d}/{s.workers_rss_kib / 1024:4.0f} "
              f"{len(ledger.accepted):8d} {sum(first.finished.values()) if first else 0:8d} "
              f"{first.chunks if first else 0:7d} {ledger.slow['closed 1013']:9d} {ledger.vanished:8d} "
              f"{ledger.violations.count:5d}  {fault[0]}", flush=True)
        await trio.sleep(every)


def drained(ledger: Ledger) -> bool:
    """Every accepted utterance finished for every healthy subscriber, every command answered."""
    return (all(c.answered >= c.sent for c in ledger.controls)
            and all(all(ch.finished[u] for u in ledger.accepted) for ch in ledger.checkers))


def final_checks(ledger: Ledger) -> None:
    """The end-of-run promises: one `utterance_finished` per accepted id for every healthy
    subscriber, none for an id nobody accepted, one answer per command."""
    for checker in ledger.checkers:
        missing = [u for u in ledger.accepted if checker.finished[u] == 0]
        for utt in missing:
            ledger.violations.add("no_finished", f"{checker.name}: accepted {utt} never finished")
        for utt in set(checker.finished) - set(ledger.accepted):
            ledger.violations.add("finished_not_accepted", f"{checker.name}: {utt} finished, never accepted")
    for control in ledger.controls:
        if control.answered != control.sent:
            ledger.violations.add("answers", f"{control.name}: {control.sent} commands, {control.answered} answers")


async def soak(args: argparse.Namespace) -> Run:
    rng = random.Random(args.seed)
    ledger = Ledger()
    run = Run(ledger)
    run.log_path = args.log or Path(tempfile.mkdtemp(prefix="speechcast-soak-")) / "daemon.log"
    fake = soak_faults.new_fake()
    fault = ["healthy"]
    async with trio.open_nursery() as outer:
        kokoros_url = await outer.start(fake.serve)
        async with daemon_process(DAEMON_ARGS, {"SPEECHCAST_KOKOROS_URL": kokoros_url}, run.log_path) as daemon:
            url = f"ws://127.0.0.1:{daemon.port}/"
            print(f"daemon pid {daemon.process.pid} on {url}, fake Kokoros at {kokoros_url}, "
                  f"log {run.log_path}, seed {args.seed}", flush=True)
            started = time.monotonic()
            async with trio.open_nursery() as clients:  # they live until the daemon's 1001
                for i in range(args.healthy):
                    fmt, compress = SUBSCRIBER_VARIANTS[i % len(SUBSCRIBER_VARIANTS)]
                    await clients.start(soak_clients.healthy, f"healthy-{i}", url, fmt, compress, ledger)
                for i in range(args.controls):
                    control = Control(f"control-{i}", url, random.Random(rng.random()), ledger, COMMAND_INTERVAL)
                    ledger.controls.append(control)
                    await clients.start(control.run)
                reporter = trio.CancelScope()

                async def report() -> None:
                    with reporter:
                        await report_every(daemon, run, started, args.sample, fault)

                clients.start_soon(report)
                clients.start_soon(watch, daemon, ledger, clients.cancel_scope)
                phases = ((args.warmup, "warm-up"), (max(0.0, args.minutes * 60 - args.warmup), "load"))
                for seconds, name in phases:
                    await load_for(seconds, daemon, fake, rng, run, fault)
                    print(f"{name} over at {time.monotonic() - started:.0f} s; draining", flush=True)
                    rss = await settle(daemon, run, fake, fault, started, args.drain)
                    if name == "warm-up":
                        run.warmup_rss_kib = rss
                run.end_rss_kib = rss
                reporter.cancel()
                await end(daemon, run)
                clients.cancel_scope.deadline = trio.current_time() + 15  # after the 1001s, bounded
            run.stray_lines = list(daemon.stray_lines)
            run.daemon_counts = dict(daemon.counts)
        outer.cancel_scope.cancel()
    return run


async def load_for(seconds: float, daemon: DaemonProcess, fake, rng: random.Random, run: Run, fault: list[str]) -> None:
    """Random commands, churning subscribers and provider faults for `seconds`."""
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as load:
            for control in run.ledger.controls:
                load.start_soon(control.send_forever)
            load.start_soon(switch_faults, fake, rng, run, fault)
            load.start_soon(churn, daemon.port, f"ws://127.0.0.1:{daemon.port}/", rng, run.ledger)


async def settle(daemon: DaemonProcess, run: Run, fake, fault: list[str], started: float, drain: float) -> int:
    """With the load off and the fake healthy, cancel everything queued (on a busy machine
    the queue holds minutes of speech) and wait (bounded) until every accepted utterance has
    finished for every healthy subscriber; then the daemon's RSS, idle."""
    soak_faults.switch(fake, soak_faults.HEALTHY)
    if run.ledger.controls:
        await run.ledger.controls[0].send("cancel_all (end of phase)", {"type": "cancel", "all": True})
    fault[0] = "(idle)"
    run.drained = False
    with trio.move_on_after(drain):
        while not drained(run.ledger) and daemon.process.returncode is None:
            await trio.sleep(0.5)  # a bench polling its own counters, not a test's sync
        run.drained = daemon.process.returncode is None
    await trio.sleep(1.0)  # let a late duplicate finished or stray chunk show itself
    last = sample(daemon, started)
    run.samples.append(last)
    return last.rss_kib


async def end(daemon: DaemonProcess, run: Run) -> None:
    """The end-of-run checks, `/healthz`, SIGTERM, and the exit code."""
    ledger = run.ledger
    final_checks(ledger)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            run.healthz = (await client.get(f"http://127.0.0.1:{daemon.http_port}/healthz")).status_code
    except httpx.HTTPError as e:
        print(f"/healthz: {type(e).__name__}", flush=True)
    ledger.ending = True
    daemon.process.send_signal(signal.SIGTERM)
    with trio.move_on_after(SIGTERM_WAIT):
        run.exit_code = await daemon.process.wait()
    if run.exit_code is None:
        ledger.violations.add("sigterm", f"still running {SIGTERM_WAIT:g} s after SIGTERM")


def print_table(run: Run, args: argparse.Namespace) -> None:
    ledger, v = run.ledger, run.ledger.violations
    rss = [s.rss_kib for s in run.samples]
    start = rss[0] if rss else 0
    workers = [s.workers_rss_kib for s in run.samples]
    first = ledger.checkers[0] if ledger.checkers else None
    chunks = sorted({c.chunks for c in ledger.checkers})
    mib = lambda k: f"{k / 1024:.1f} MiB"  # noqa: E731
    rows = [
        ("machine", describe()),
        ("run", f"{args.minutes:g} min of load, warm-up {args.warmup:g} s, seed {args.seed}, "
                f"{args.healthy} healthy subscribers, {args.controls} control connections"),
        ("daemon RSS start / idle after warm-up / idle at end / max",
         f"{mib(start)} / {mib(run.warmup_rss_kib)} / {mib(run.end_rss_kib)} / {mib(max(rss, default=0))}"),
        ("RSS growth (idle after warm-up to idle at end)", f"{run.growth:+.1f} % (target < {RSS_GROWTH_TARGET:g} %)"),
        ("worker processes RSS (max)", f"{max((s.workers for s in run.samples), default=0)} processes, "
                                       f"{mib(max(workers, default=0))}"),
        ("commands sent", _counts(ledger.sent)),
        ("answers", _counts(ledger.answers)),
        ("utterance errors", _counts(ledger.utterance_errors) or "none"),
        ("utterances accepted", str(len(ledger.accepted))),
        ("utterances finished (healthy-0)", f"{sum(first.finished.values()) if first else 0}: "
                                            f"{_counts(first.statuses) if first else ''}"),
        ("chunks per healthy subscriber", " / ".join(map(str, chunks)) + (" (all equal)" if len(chunks) == 1 else "")),
        ("frames lost by healthy subscribers", f"{run.lost} (target 0)"),
        ("slow subscribers", _counts(ledger.slow) or "none"),
        ("vanishing subscribers", str(ledger.vanished)),
        ("oversized frames", _counts(ledger.oversized) or "none"),
        ("fault modes (s)", ", ".join(f"{k} {s:.0f}" for k, s in sorted(run.fault_seconds.items()))),
        ("daemon log", f"{run.daemon_counts.get('subscriber.too_slow', 0)} subscriber.too_slow, "
                       f"{run.daemon_counts.get('provider.failed', 0)} provider.failed, "
                       f"{run.daemon_counts.get('command.rejected', 0)} command.rejected; {run.log_path}"),
        ("queue drained", "yes" if run.drained else f"NO (after {args.drain:g} s)"),
        ("GET /healthz at the end", str(run.healthz)),
        ("exit code after SIGTERM", str(run.exit_code)),
        ("invariant violations", f"{v.count} (target 0)" + (f": {_counts(v.by_kind)}" if v.count else "")),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")
    for line in v.first:
        print(f"  - {line}")
    if run.stray_lines:
        print("daemon output that was not a JSON log line (last lines):")
        print("\n".join("    " + line for line in run.stray_lines[-10:]))
    print("\nall targets met" if run.targets_met() else "\nTARGET MISSED", flush=True)


def _counts(counter) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(counter.items(), key=lambda kv: -kv[1]))




def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    run = trio.run(soak, args)
    print_table(run, args)
    return 0 if run.targets_met() else 1


if __name__ == "__main__":
    sys.exit(main())
