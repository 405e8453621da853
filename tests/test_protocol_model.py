"""A stateful test of the whole protocol (issue 11, Build item 6): hypothesis drives random
interleavings of every command, connects and disconnects, and provider failures against
a real daemon, and after every step checks that the daemon agrees with a small reference
model of the session written from docs/session.md.

How it runs: the daemon (`pipeline.daemon.serve`, loopback, port 0) lives in a trio loop
on a background thread, on the autojump MockClock; each (synchronous) rule calls into it
with `trio.from_thread.run`, bounded by `trio.fail_after`. The clock is safe with real
sockets because nothing in the daemon waits on a timer while the test runs: keep-alive
pings and close handshakes wait forever (`math.inf`), voices are held by the test, and
the breaker's cool-down outlasts any jump. Every wait is on something the daemon says
(an answer, an `utterance_finished`) or does (a voice starting to speak), never a sleep.

Voices (`GatedVoice`) speak one block and then hold until the test decides the rest
(finish, or fail midway); a message whose text says "broken" makes its voice fail before
any audio; each voice's health check can be scripted to fail. Commands go through
control-only connections (`subscribe=0`), where every text frame without an
`utterance_id` is the answer to a command; one subscriber (`watcher`) stays connected
the whole time and sees every utterance's events and chunks.

`SPEECHCAST_FUZZ=long` (what `make fuzz` sets) runs many more and longer examples.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, precondition, rule
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url, open_websocket_url

from pipeline import protocol
from pipeline.commands import TTSProvider
from pipeline.config import Settings
from pipeline.daemon import RunningDaemon, serve
from pipeline.errors import ProviderFailed, ProviderUnavailable
from pipeline.session import SessionInput, SessionState, transition
from tests.support import ScriptedProvider, provider_set, tone

LONG = os.environ.get("SPEECHCAST_FUZZ") == "long"
# Mock seconds any one call into the daemon may take: on the autojump clock a deadlock
# shows up as this timeout at once, not after a real wait.
STEP_TIMEOUT = 60.0
PIPER, KOKOROS, OPENAI = TTSProvider.PIPER, TTSProvider.KOKOROS, TTSProvider.OPENAI
CONFIGURED = (PIPER, KOKOROS)  # openai is left out on purpose: "not configured"
MAX_PENDING = 3
BREAKER_FAILURES = 2

SETTINGS = Settings(
    port=0,
    http_port=0,
    fallback=(),  # a failure is final: the model need not know the fallback order
    lookahead=0,
    short_first_piece=False,  # one piece per message: one synthesize call per utterance
    max_pending=MAX_PENDING,
    rate_limit=1e6,
    rate_burst=1_000_000,
    # Timers that must never fire while the clock jumps (see the module docstring).
    ping_interval=math.inf,
    ping_timeout=math.inf,
    close_timeout=math.inf,
    breaker_failures=BREAKER_FAILURES,
    breaker_cooldown=1e9,
    piece_timeout=math.inf,  # a voice held "in the middle" must not time out as the clock jumps
)

# The answers to commands (with `error`s that name no utterance, and `closed`).
ANSWERS = ("accepted", "ready", "provider_changed", "cancelled")


# ---------------------------------------------------------------- the scripted voice


class GatedVoice(ScriptedProvider):
    """Speaks one block, then holds until the test `decide`s: "ok" (one more block) or
    "fail" (ProviderFailed midway). A text containing "broken" fails before any audio.
    `check_fails` makes its health check raise ProviderUnavailable."""

    known_voices = frozenset({"scripted"})

    def __init__(self, name: TTSProvider, changed: Callable[[], None]) -> None:
        super().__init__(name)
        self.check_fails = False
        self._changed = changed
        self._decisions: dict[str, str] = {}
        self._decided: dict[str, trio.Event] = {}

    async def check(self) -> None:
        if self.check_fails:
            raise ProviderUnavailable(f"{self.name.value} is scripted to fail its check")

    def decide(self, text: str, outcome: str) -> None:
        self._decisions[text] = outcome
        self._decided.setdefault(text, trio.Event()).set()

    async def synthesize(self, text: str, voice: str | None, speed: float | None) -> AsyncIterator[bytes]:
        self.texts.append(text)
        self._changed()
        if "broken" in text:
            raise ProviderFailed(f"{self.name.value} is scripted to fail before any audio")
        yield tone(2400)
        await self._decided.setdefault(text, trio.Event()).wait()
        if self._decisions[text] == "fail":
            raise ProviderFailed(f"{self.name.value} is scripted to fail midway")
        yield tone(2400)


# ---------------------------------------------------------------- clients and the daemon


@dataclass(eq=False)
class Client:
    """One WebSocket connection and everything it received (read by its own task, so the
    daemon never sees it as slow). `expected*` is what the model says it should get."""

    ws: WebSocketConnection
    subscribe: bool
    name: str
    events: list[dict[str, Any]] = field(default_factory=list)
    frames: list[protocol.VoiceFrame] = field(default_factory=list)
    order: list[Any] = field(default_factory=list)  # events and frames, in arrival order
    expected: list[dict[str, Any]] = field(default_factory=list)  # answers except `closed`
    expected_closed: int = 0

    def __repr__(self) -> str:  # hypothesis prints it in the failing steps
        return self.name

    def answers(self) -> list[dict[str, Any]]:
        """Every answer to a command (what a control-only connection gets without an
        utterance_id), except `closed`, which may come at any point after its Close."""
        return [e for e in self.events if e["type"] in ANSWERS or (e["type"] == "error" and "utterance_id" not in e)]

    def closed_answers(self) -> int:
        return sum(e["type"] == "closed" for e in self.events)


class Harness:
    """The daemon in its own thread's trio loop (MockClock), and the calls into it."""

    def __init__(self) -> None:
        self.failed = False
        self.clients: list[Client] = []
        self.voices: dict[TTSProvider, GatedVoice] = {}
        self.changed: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="speechcast-model", daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the daemon did not start within 60 s")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            trio.run(self._main, clock=trio.testing.MockClock(autojump_threshold=0))
        except BaseException as e:  # reported to the test thread
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self.changed = trio.Event()
        self.voices = {name: GatedVoice(name, self.notify) for name in CONFIGURED}
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self.daemon: RunningDaemon = await nursery.start(serve, SETTINGS, provider_set(SETTINGS, *self.voices.values()))
            self.token = trio.lowlevel.current_trio_token()
            # No kept-alive connections: hypercorn's keep-alive timer would make the clock jump.
            no_keep_alive = httpx.Limits(max_keepalive_connections=0)
            base = f"http://127.0.0.1:{self.daemon.http_port}"
            self.http = await nursery.start(_http_client, base, no_keep_alive)
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def notify(self) -> None:
        """Something was received or done: wake every `wait_for`."""
        assert self.changed is not None
        self.changed.set()
        self.changed = trio.Event()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `await fn(*args)` in the daemon's loop, within STEP_TIMEOUT mock seconds."""

        async def bounded() -> Any:
            with trio.fail_after(STEP_TIMEOUT):
                return await fn(*args)

        self.failed = True  # until the call returns: teardown then checks nothing more
        result = trio.from_thread.run(bounded, trio_token=self.token)
        self.failed = False
        return result

    def stop(self) -> None:
        if self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
            self._thread.join(60)

    # ---- run in the daemon's loop

    async def wait_for(self, missing: Callable[[], str | None]) -> None:
        """Wait until `missing()` is None; on timeout say what never came."""
        with trio.move_on_after(STEP_TIMEOUT / 2):
            while True:
                assert self.changed is not None
                changed = self.changed
                if missing() is None:
                    return
                await changed.wait()
        raise AssertionError(f"the daemon never showed: {missing()}\n{self.heard()}")

    def heard(self) -> str:
        """The text events every client received (for a failure's message)."""
        return "\n".join(f"{c}: {[e for e in c.events]}" for c in self.clients)

    async def connect(self, subscribe: bool, name: str) -> Client:
        url = f"ws://127.0.0.1:{self.daemon.port}/?subscribe={int(subscribe)}"
        client = Client(await connect_websocket_url(self.nursery, url), subscribe, name)
        self.clients.append(client)
        self.nursery.start_soon(self._read, client)
        await self.wait_for(lambda: None if client.events else f"{name}: hello")
        return client

    async def _read(self, client: Client) -> None:
        try:
            while True:
                message = await client.ws.get_message()
                if isinstance(message, bytes):
                    frame = protocol.decode_voice_frame(message)
                    client.frames.append(frame)
                    client.order.append(frame)
                else:
                    event = json.loads(message)
                    client.events.append(event)
                    client.order.append(event)
                self.notify()
        except ConnectionClosed:
            pass

    async def send(self, client: Client, message: dict[str, Any]) -> None:
        await client.ws.send_message(json.dumps(message))

    async def disconnect(self, client: Client) -> None:
        await client.ws.aclose()

    async def faces(self) -> tuple[dict[str, Any], dict[str, Any], int]:
        """What a newcomer learns: hello (fresh connection), /v1/info, /readyz's status."""
        async with open_websocket_url(f"ws://127.0.0.1:{self.daemon.port}/?subscribe=0") as ws:
            hello = json.loads(await ws.get_message())
        info = (await self.http.get("/v1/info")).json()
        ready = await self.http.get("/readyz")
        return hello, info, ready.status_code


async def _http_client(
    base_url: str, limits: httpx.Limits, *, task_status: trio.TaskStatus[httpx.AsyncClient] = trio.TASK_STATUS_IGNORED
) -> None:
    """An HTTP client for the daemon's faces, open until the harness stops."""
    async with httpx.AsyncClient(base_url=base_url, limits=limits) as http:
        task_status.started(http)
        await trio.sleep_forever()


# ---------------------------------------------------------------- the reference model


@dataclass
class Model:
    """The session as docs/session.md describes it, for fallback=() and the scripted voices."""

    state: SessionState = SessionState.OPEN  # the daemon initializes itself at start
    current: TTSProvider = PIPER
    waiting: list[str] = field(default_factory=list)  # accepted, not yet speaking (FIFO)
    speaking: str | None = None
    text: dict[str, str] = field(default_factory=dict)
    one_off: dict[str, TTSProvider | None] = field(default_factory=dict)
    spoken_by: dict[str, TTSProvider] = field(default_factory=dict)
    finished: dict[str, str] = field(default_factory=dict)  # id -> status
    closers: list[Client] = field(default_factory=list)  # Closes waiting for `closed`
    check_fails: dict[TTSProvider, bool] = field(default_factory=lambda: dict.fromkeys(CONFIGURED, False))
    check_failed: dict[TTSProvider, bool] = field(default_factory=lambda: dict.fromkeys(CONFIGURED, False))
    in_a_row: dict[TTSProvider, int] = field(default_factory=lambda: dict.fromkeys(CONFIGURED, 0))
    next_id: int = 1

    def circuit_open(self, name: TTSProvider) -> bool:
        return self.in_a_row[name] >= BREAKER_FAILURES

    def ready(self) -> bool:
        """/readyz is 200: open, and the current provider (no fallbacks) can speak."""
        return self.state is SessionState.OPEN and not self.check_failed[self.current] and not self.circuit_open(self.current)

    def check(self, name: TTSProvider) -> bool:
        self.check_failed[name] = self.check_fails[name]
        return not self.check_fails[name]

    # ---- commands: each returns the answer the asker gets (None: `closed`, later)

    def initialize(self) -> dict[str, Any]:
        if self.state is SessionState.CLOSING:
            for closer in self.closers:  # answered now, before this Initialize's answer
                closer.expected_closed += 1
            self.closers.clear()
        self.state = transition(self.state, SessionInput.INITIALIZE)
        if self.check(self.current):
            return {"type": "ready", "provider": self.current.value}
        return {"type": "error", "code": "provider_unavailable"}

    def close(self, asker: Client) -> None:
        self.state = transition(self.state, SessionInput.CLOSE)
        self.closers.append(asker)

    def send_message(self, text: str, provider: TTSProvider | None, voice: str | None = None) -> dict[str, Any]:
        if self.state is not SessionState.OPEN:
            return {"type": "error", "code": "not_initialized"}
        if provider is not None and provider not in CONFIGURED:
            return {"type": "error", "code": "provider_unavailable"}
        if voice not in (None, "scripted"):
            return {"type": "error", "code": "invalid_command"}
        if len(self.waiting) >= MAX_PENDING:
            return {"type": "error", "code": "queue_full"}
        utt_id = f"u{self.next_id}"
        self.next_id += 1
        self.text[utt_id], self.one_off[utt_id] = text, provider
        answer = {"type": "accepted", "utterance_id": utt_id, "position": len(self.waiting)}
        self.waiting.append(utt_id)
        return answer

    def set_tts_provider(self, name: TTSProvider) -> dict[str, Any]:
        if name not in CONFIGURED:
            return {"type": "error", "code": "provider_unavailable"}
        self.current = name
        self.check(name)  # in the background, for /readyz
        return {"type": "provider_changed", "provider": name.value}

    def cancel(self, everything: bool) -> dict[str, Any]:
        ids = [self.speaking] if self.speaking else []
        if self.speaking:
            self.finished[self.speaking] = "cancelled"
            self.speaking = None
        if everything:
            for utt_id in self.waiting:
                self.finished[utt_id] = "cancelled"
            ids += self.waiting
            self.waiting = []
        return {"type": "cancelled", "utterance_ids": ids}

    # ---- the speaker

    def finish_speaking(self, outcome: str) -> None:
        assert self.speaking is not None
        name = self.spoken_by[self.speaking]
        if outcome == "ok":
            self.in_a_row[name] = 0
            self.finished[self.speaking] = "ok"
        else:
            self.in_a_row[name] += 1
            self.finished[self.speaking] = "partial"  # audio went out before the failure
        self.speaking = None

    def settle(self) -> None:
        """Let the speaker run until it holds a voice or has nothing left to do."""
        while self.speaking is None:
            if self.waiting:
                utt_id = self.waiting.pop(0)
                name = self.one_off[utt_id] or self.current
                self.spoken_by[utt_id] = name
                if self.circuit_open(name):
                    self.finished[utt_id] = "failed"  # skipped: nothing synthesized
                elif "broken" in self.text[utt_id]:
                    self.in_a_row[name] += 1
                    self.finished[utt_id] = "failed"
                else:
                    self.speaking = utt_id
            elif self.state is SessionState.CLOSING:
                self.state = transition(self.state, SessionInput.DRAINED)
                for closer in self.closers:
                    closer.expected_closed += 1
                self.closers.clear()
            else:
                return


# ---------------------------------------------------------------- the state machine


def matches(event: dict[str, Any], expected: dict[str, Any]) -> bool:
    return all(event.get(k) == v for k, v in expected.items())


class ProtocolMachine(RuleBasedStateMachine):
    controls = Bundle("controls")
    listeners = Bundle("listeners")

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.messages = 0
        self.names = 0
        self.live: list[Client] = []  # control connections still open
        self.h = Harness()
        try:
            self.watcher = self.h.call(self.h.connect, True, "watcher")
        except BaseException:
            self.h.stop()
            raise

    # ---- connections

    def _connect(self, subscribe: bool) -> Client:
        self.names += 1
        client: Client = self.h.call(self.h.connect, subscribe, f"{'listener' if subscribe else 'control'}{self.names}")
        hello = client.events[0]
        assert hello["type"] == "hello", hello
        assert (hello["session"], hello["provider"]) == (self.model.state, self.model.current.value), hello
        if not subscribe:
            self.live.append(client)
        return client

    @initialize(target=controls)
    def first_control(self) -> Client:
        return self._connect(False)

    @rule(target=controls)
    def connect_control(self) -> Client:
        return self._connect(False)

    @precondition(lambda self: len(self.live) > 1)  # keep one to send commands on
    @rule(client=consumes(controls))
    def disconnect_control(self, client: Client) -> None:
        self.h.call(self.h.disconnect, client)
        self.live.remove(client)
        self.model.closers = [c for c in self.model.closers if c is not client]

    @rule(target=listeners)
    def connect_listener(self) -> Client:
        return self._connect(True)

    @rule(client=consumes(listeners))
    def disconnect_listener(self, client: Client) -> None:
        self.h.call(self.h.disconnect, client)

    # ---- commands

    def _command(self, client: Client, message: dict[str, Any], answer: dict[str, Any] | None) -> None:
        """Send one command, then a probe that changes nothing (a message in a voice no
        provider has) on the same connection: its answer shows the router took the command,
        and is the model's `send_message` answer in the state it left."""
        self.h.call(self.h.send, client, message)
        if answer is not None:
            # Wait for it before the probe: an Initialize is answered when its check ends,
            # off the command loop, so a pipelined probe's answer could overtake it.
            client.expected.append(answer)
            want = len(client.expected)
            self.h.call(self.h.wait_for, lambda: None if len(client.answers()) >= want else f"{client}: answer {answer}")
        self.model.settle()
        probe = {"type": "send_message", "text": "A probe.", "voice": "nobody"}
        client.expected.append(self.model.send_message("A probe.", None, voice="nobody"))
        self.h.call(self.h.send, client, probe)
        self._catch_up()

    @rule(client=controls)
    def initialize(self, client: Client) -> None:
        self._command(client, {"type": "initialize"}, self.model.initialize())

    @rule(client=controls)
    def close(self, client: Client) -> None:
        self.model.close(client)
        self._command(client, {"type": "close"}, None)

    @rule(client=controls, broken=st.booleans())
    def send_message(self, client: Client, broken: bool) -> None:
        self._send_message(client, None, broken)

    @rule(client=controls, provider=st.sampled_from([PIPER, KOKOROS, OPENAI]), broken=st.booleans())
    def send_message_one_off(self, client: Client, provider: TTSProvider, broken: bool) -> None:
        self._send_message(client, provider, broken)

    def _send_message(self, client: Client, provider: TTSProvider | None, broken: bool) -> None:
        self.messages += 1
        text = f"Message {self.messages}{' broken' if broken else ''}"
        message: dict[str, Any] = {"type": "send_message", "text": text}
        if provider is not None:
            message["provider"] = provider.value
        self._command(client, message, self.model.send_message(text, provider))

    @rule(client=controls, provider=st.sampled_from([PIPER, KOKOROS, OPENAI]))
    def set_tts_provider(self, client: Client, provider: TTSProvider) -> None:
        self._command(client, {"type": "set_tts_provider", "provider": provider.value}, self.model.set_tts_provider(provider))

    @rule(client=controls, everything=st.booleans())
    def cancel(self, client: Client, everything: bool) -> None:
        message: dict[str, Any] = {"type": "cancel", "all": True} if everything else {"type": "cancel"}
        self._command(client, message, self.model.cancel(everything))

    # ---- the voices

    @precondition(lambda self: self.model.speaking is not None)
    @rule(outcome=st.sampled_from(["ok", "ok", "fail"]))
    def finish_speaking(self, outcome: str) -> None:
        self._finish(outcome)

    def _finish(self, outcome: str) -> None:
        utt_id = self.model.speaking
        assert utt_id is not None
        voice = self.h.voices[self.model.spoken_by[utt_id]]
        trio.from_thread.run_sync(voice.decide, self.model.text[utt_id], outcome, trio_token=self.h.token)
        self.model.finish_speaking(outcome)
        self.model.settle()
        self._catch_up()

    @rule(provider=st.sampled_from(CONFIGURED), fails=st.booleans())
    def script_check(self, provider: TTSProvider, fails: bool) -> None:
        """The provider's next health checks fail (or pass again); seen at the next check."""
        self.model.check_fails[provider] = fails
        self.h.voices[provider].check_fails = fails

    # ---- agreement

    def _missing(self) -> str | None:
        """What the model says has happened but the daemon has not shown yet."""
        for client in self.live:
            if len(client.answers()) < len(client.expected):
                return f"{client}: answer {client.expected[len(client.answers())]}"
            if client.closed_answers() < client.expected_closed:
                return f"{client}: a `closed` answer"
        seen = {e["utterance_id"] for e in self.watcher.events if e["type"] == "utterance_finished"}
        for utt_id in self.model.finished:
            if utt_id not in seen:
                return f"utterance_finished for {utt_id} ({self.model.finished[utt_id]})"
        if (utt_id := self.model.speaking) is not None:
            name = self.model.spoken_by[utt_id]
            if self.model.text[utt_id] not in self.h.voices[name].texts:
                return f"{utt_id} speaking on {name.value}"
        return None

    def _catch_up(self) -> None:
        """Wait until the daemon has shown all the model expects, then compare."""
        self.h.call(self.h.wait_for, self._missing)
        for client in self.live:
            answers = client.answers()
            assert len(answers) == len(client.expected), (client, answers, client.expected)
            for got, want in zip(answers, client.expected):
                assert matches(got, want), (client, got, want)
            assert client.closed_answers() == client.expected_closed, (client, client.closed_answers(), client.expected_closed)
        finished = [e for e in self.watcher.events if e["type"] == "utterance_finished"]
        statuses = {e["utterance_id"]: e["status"] for e in finished}
        assert len(statuses) == len(finished), f"an utterance finished twice: {finished}"
        assert statuses == self.model.finished

    @invariant()
    def every_face_agrees(self) -> None:
        hello, info, readyz = self.h.call(self.h.faces)
        expected = (self.model.state.value, self.model.current.value)
        assert (hello["session"], hello["provider"]) == expected, hello
        assert (info["session"], info["provider"]) == expected, info
        assert readyz == (200 if self.model.ready() else 503), (readyz, self.model)

    def teardown(self) -> None:
        try:
            if self.h.failed:
                return  # a step failed already; that is the report
            # Release every held voice and let the queue drain.
            while self.model.speaking is not None:
                self._finish("ok")
            self._check_every_utterance()
        finally:
            self.h.stop()

    def _check_every_utterance(self) -> None:
        """Every accepted utterance got exactly one utterance_finished (seen by a subscriber
        connected the whole time), its chunks contiguous and counted right."""
        accepted = {e["utterance_id"] for c in self.live for e in c.events if e["type"] == "accepted"}
        assert accepted <= set(self.model.text)
        finished = Counter(e["utterance_id"] for e in self.watcher.events if e["type"] == "utterance_finished")
        assert set(finished) == set(self.model.text) and set(finished.values()) <= {1}, finished
        ids = [f.chunk_id for f in self.watcher.frames]
        assert ids == list(range(ids[0], ids[0] + len(ids))) if ids else True, ids
        frames: list[protocol.VoiceFrame] = []
        speaking: str | None = None
        first_chunk_id: int | None = None
        for item in self.watcher.order:
            if isinstance(item, protocol.VoiceFrame):
                assert speaking is not None, "a chunk outside any utterance"
                frames.append(item)
            elif item["type"] == "utterance_started":
                assert speaking is None, item
                speaking, frames, first_chunk_id = item["utterance_id"], [], item["first_chunk_id"]
            elif item["type"] == "utterance_finished":
                if item["utterance_id"] != speaking:  # never started: no audio at all
                    assert item["chunks"] == 0 and item["last_chunk_id"] is None, item
                    continue
                assert item["chunks"] == len(frames), (item, len(frames))
                assert not frames or frames[0].chunk_id == first_chunk_id, (item, first_chunk_id)
                assert item["last_chunk_id"] == (frames[-1].chunk_id if frames else None), item
                finals = sum(f.is_final for f in frames)
                if item["status"] in ("ok", "partial"):
                    assert finals == 1 and frames[-1].is_final, item
                speaking = None


ProtocolMachine.TestCase.settings = settings(
    max_examples=1000 if LONG else 60,
    stateful_step_count=50 if LONG else 30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestProtocolModel = ProtocolMachine.TestCase
