"""The clients of the soak run, all in this process on loopback:

- `Control`: a `subscribe=0` connection sending random commands, valid and invalid, at a
  bounded rate (well under the daemon's 20/s per connection), recording the `accepted`
  utterance ids and checking every command gets exactly one answer;
- `healthy`: a subscriber that reads everything and feeds a `StreamChecker`; it must never
  be disconnected (until the daemon's 1001 at SIGTERM);
- `slow`: a subscriber with a tiny receive buffer that stops reading for a while, then
  drains: the daemon should drop it with 1013 once it falls `subscriber_queue_bytes` behind;
- `vanishing`: a subscriber that reads for a moment and then resets the TCP connection
  (or just closes it) without a close handshake, often in the middle of a frame;
- `oversized`: a connection that sends a frame over `max_message_size` (expects 1009).

Slow and vanishing subscribers speak WebSocket through `wsproto` on a raw socket so they
can misbehave at the TCP level, which a full client library would not let them do.
"""

from __future__ import annotations

import collections
import json
import random
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import ConnectionClosed, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, RejectConnection, Request

from bench.soak_checks import StreamChecker, Violations

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please remember to water the plants on Tuesday.",
    "Our next stop is the central station.",
    "It is a fine day for a walk along the river.",
    "Dr. Smith will see you at three o'clock.",
    "The meeting moved to room twelve, e.g. the one upstairs.",
    "Coffee costs $2.50 at the corner shop.",
    "Thank you for waiting, your call matters to us.",
    "Rain is expected later this evening, so take an umbrella.",
    "Welcome aboard, and enjoy the flight.",
)
PROVIDERS = ("piper", "kokoros")
# Replies that answer a command (DESIGN section 4, "Replies"); `error` too when it is not
# about an utterance. Everything else a control connection gets is about its utterances.
ANSWERS = frozenset({"accepted", "ready", "provider_changed", "closed", "cancelled"})
CLOSE_TOO_SLOW = 1013
CLOSE_TOO_BIG = 1009
READ_BYTES = 65536
# A slow subscriber's kernel receive buffer: small, so that falling behind reaches the
# daemon's own queue within seconds instead of after megabytes of loopback buffering.
SLOW_RCVBUF = 8192


def close_of(e: ConnectionClosed) -> tuple[int, str]:
    """(close code, reason) of a closed connection; 1006 when no close frame came."""
    return (e.reason.code, e.reason.reason or "") if e.reason is not None else (1006, "")


def random_text(rng: random.Random) -> str:
    return " ".join(rng.sample(SENTENCES, rng.randint(1, 3)))


def _send(rng: random.Random) -> dict[str, Any]:
    command: dict[str, Any] = {"type": rng.choice(("send_message", "send_message", "tts")), "text": random_text(rng)}
    if rng.random() < 0.2:
        command["provider"] = rng.choice(PROVIDERS)  # a one-off provider for this utterance
    return command


# (name, weight, message builder): a str is sent as a text frame, bytes as a binary frame.
COMMANDS: tuple[tuple[str, int, Callable[[random.Random], Any]], ...] = (
    ("send_message", 60, _send),
    ("set_tts_provider", 6, lambda rng: {"type": "set_tts_provider", "provider": rng.choice(PROVIDERS)}),
    ("cancel", 4, lambda rng: {"type": "cancel"}),
    ("cancel_all", 1, lambda rng: {"type": "cancel", "all": True}),
    ("initialize", 3, lambda rng: {"type": "initialize"}),
    ("close", 1, lambda rng: {"type": "close"}),
    ("bad_json", 2, lambda rng: '{"type": "send_message", "text": '),
    ("unknown_type", 1, lambda rng: {"type": "dance"}),
    ("empty_text", 1, lambda rng: {"type": "send_message", "text": " \t "}),
    ("huge_text", 1, lambda rng: {"type": "send_message", "text": "word " * 1000}),
    ("wrong_field_type", 1, lambda rng: {"type": "send_message", "text": 42}),
    ("unknown_provider", 1, lambda rng: {"type": "set_tts_provider", "provider": "nobody"}),
    ("binary", 1, lambda rng: rng.randbytes(rng.randint(1, 64))),
)


@dataclass
class Ledger:
    """What all the clients of the run saw, for the sampler and the final report."""

    violations: Violations = field(default_factory=Violations)
    accepted: dict[str, str] = field(default_factory=dict)  # utterance id -> control name
    sent: collections.Counter[str] = field(default_factory=collections.Counter)  # per command kind
    answers: collections.Counter[str] = field(default_factory=collections.Counter)  # type or error code
    utterance_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    slow: collections.Counter[str] = field(default_factory=collections.Counter)  # outcome
    vanished: int = 0
    oversized: collections.Counter[str] = field(default_factory=collections.Counter)
    checkers: list[StreamChecker] = field(default_factory=list)
    controls: list[Control] = field(default_factory=list)
    ending: bool = False  # SIGTERM sent: a 1001 close is now expected


class Control:
    """One control connection: a sender of random commands and a reader of the answers."""

    def __init__(self, name: str, url: str, rng: random.Random, ledger: Ledger, interval: tuple[float, float]) -> None:
        self.name, self.url, self.rng, self.ledger, self.interval = name, url, rng, ledger, interval
        self.sent = 0
        self.answered = 0
        self.closed_code: int | None = None
        self.ws: Any = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, then read answers until the daemon closes the connection; commands are
        sent by `send_forever`, run by whoever decides when the load is on."""
        async with open_websocket_url(self.url + "?subscribe=0", receive_buffer_size=READ_BYTES) as ws:
            hello = json.loads(await ws.get_message())
            if hello.get("type") != "hello":
                self.ledger.violations.add("no_hello", f"{self.name} got {hello.get('type')} first")
            self.ws = ws
            task_status.started()
            await self._read(ws)

    async def send_forever(self) -> None:
        """Send random commands at a bounded rate until cancelled."""
        names, weights = zip(*((n, w) for n, w, _ in COMMANDS), strict=True)
        builders = {n: b for n, _, b in COMMANDS}
        while True:
            name = self.rng.choices(names, weights)[0]
            if not await self.send(name, builders[name](self.rng)):
                return
            await trio.sleep(self.rng.uniform(*self.interval))

    async def send(self, name: str, message: Any) -> bool:
        """Send one command (a dict as JSON, str or bytes as they are); False once closed."""
        # Shielded: a send cut short by the end of a load phase would leave half a frame.
        with trio.CancelScope(shield=True):
            try:
                await self.ws.send_message(message if isinstance(message, (str, bytes)) else json.dumps(message))
            except ConnectionClosed:
                return False
            self.sent += 1
            self.ledger.sent[name] += 1
        return True

    async def _read(self, ws: Any) -> None:
        try:
            while True:
                event = json.loads(await ws.get_message())
                kind = event.get("type")
                if kind == "error" and event.get("utterance_id") is not None:
                    self.ledger.utterance_errors[str(event.get("code"))] += 1
                elif kind in ANSWERS or kind == "error":
                    self.answered += 1
                    self.ledger.answers[event["code"] if kind == "error" else kind] += 1
                    if kind == "accepted":
                        self.ledger.accepted[str(event["utterance_id"])] = self.name
        except ConnectionClosed as e:
            code, reason = close_of(e)
            self.closed_code = code
            if not (self.ledger.ending and code == 1001):
                self.ledger.violations.add("control_disconnected", f"{self.name}: close {code} {reason}")


async def healthy(name: str, url: str, fmt: str, compress: bool, ledger: Ledger,
                  *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """A subscriber that reads everything at once and checks it; ends at the daemon's close."""
    checker = StreamChecker(name, fmt, ledger.violations)
    ledger.checkers.append(checker)
    query = f"?format={fmt}&compress={int(compress)}"
    async with open_websocket_url(url + query, receive_buffer_size=READ_BYTES) as ws:
        hello = json.loads(await ws.get_message())
        if hello.get("type") != "hello":
            ledger.violations.add("no_hello", f"{name} got {hello.get('type')} first")
        task_status.started()
        try:
            while True:
                message = await ws.get_message()
                if isinstance(message, bytes):
                    checker.frame(message)
                else:
                    checker.event(json.loads(message))
        except ConnectionClosed as e:
            code, reason = close_of(e)
            if not (ledger.ending and code == 1001):
                ledger.violations.add("healthy_disconnected", f"{name}: close {code} {reason}")


async def _raw_connect(port: int, path: str, rcvbuf: int | None = None) -> tuple[trio.SocketStream, WSConnection]:
    """A WebSocket handshake on a plain socket; returns the socket stream and the protocol.

    Error handling: ConnectionError if the daemon refuses or closes during the handshake.
    """
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:  # before connect, so the advertised window is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=f"127.0.0.1:{port}", target=path)))
    while data := await stream.receive_some(READ_BYTES):
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                return stream, ws
            if isinstance(event, RejectConnection):
                break
    await stream.aclose()
    raise ConnectionError("handshake refused")


async def _reset(stream: trio.SocketStream) -> None:
    """Close with a TCP RST (SO_LINGER 0): the peer sees the connection torn, not ended."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


async def vanishing(port: int, rng: random.Random, ledger: Ledger) -> None:
    """Subscribe, read for up to 2 s, then leave without a close handshake."""
    path = rng.choice(("/", "/?format=pcm", "/?compress=1", "/?format=pcm&compress=1", "/?format=opus"))
    try:
        stream, _ = await _raw_connect(port, path)
    except OSError:
        return ledger.violations.add("handshake_failed", f"vanishing subscriber {path}")
    try:
        with trio.move_on_after(rng.uniform(0.0, 2.0)):
            while await stream.receive_some(rng.choice((1, 100, READ_BYTES))):  # odd sizes: stop mid-frame
                pass
    finally:
        ledger.vanished += 1
        if rng.random() < 0.7:
            await _reset(stream)
        else:
            await stream.aclose()  # a FIN, still no close frame


async def slow(port: int, rng: random.Random, ledger: Ledger, stall: tuple[float, float]) -> None:
    """Subscribe, stop reading for a while, then drain and see how the daemon ended it."""
    try:
        stream, ws = await _raw_connect(port, "/", SLOW_RCVBUF)
    except OSError:
        return ledger.violations.add("handshake_failed", "slow subscriber")
    try:
        await trio.sleep(rng.uniform(*stall))
        await _drain_slow(stream, ws, ledger)
    finally:
        await _reset(stream)


async def _drain_slow(stream: trio.SocketStream, ws: WSConnection, ledger: Ledger) -> None:
    """Read a slow subscriber's backlog fast and record how the daemon ended it."""
    outcome = "not dropped"
    with trio.move_on_after(15):
        try:
            while outcome == "not dropped":
                data = await stream.receive_some(READ_BYTES)
                if not data:
                    outcome = "cut without close frame"
                    break
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, Ping):
                        await stream.send_all(ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        outcome = f"closed {event.code}"
        except trio.BrokenResourceError:
            outcome = "cut without close frame"
    ledger.slow[outcome] += 1


async def oversized(url: str, ledger: Ledger) -> None:
    """Send one text frame over the daemon's max_message_size; expect a 1009 close."""
    outcome = "still open"
    with trio.move_on_after(10):
        try:
            async with open_websocket_url(url, receive_buffer_size=READ_BYTES) as ws:
                await ws.send_message("x" * 70000)
                while True:
                    await ws.get_message()
        except ConnectionClosed as e:
            outcome = f"closed {close_of(e)[0]}"
        except OSError as e:
            outcome = f"error {type(e).__name__}"
    ledger.oversized[outcome] += 1
    if outcome != f"closed {CLOSE_TOO_BIG}":
        ledger.violations.add("oversized_frame", f"a 70 KB frame got {outcome}, not a {CLOSE_TOO_BIG} close")
