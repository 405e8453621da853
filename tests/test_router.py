"""The router actor: session state, FIFO queue, provider switching and cancel, driven
through its channels with scripted providers and the autojump MockClock."""

from __future__ import annotations

import dataclasses

import pytest
import trio
import trio.testing

from actors.router import Router
from pipeline.commands import Cancel, Close, Initialize, SendMessage, SetTTSProvider, TTSProvider
from pipeline.config import Settings
from pipeline.errors import ProviderFailed
from pipeline.events import Accepted, Cancelled, Closed, ErrorEvent, ProviderChanged, Ready, Status
from pipeline.flow import Audio, Broadcast, Envelope, Reply, UtteranceBegin, UtteranceEnd
from tests.support import ScriptedProvider, provider_set, tone

SETTINGS = Settings(max_pending=3, fallback=())


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


class RouterUnderTest:
    def __init__(self, nursery: trio.Nursery, settings: Settings, *providers: ScriptedProvider) -> None:
        self.commands, commands_recv = trio.open_memory_channel(100)
        speech_send, self.speech = trio.open_memory_channel(1000)
        self.router = Router(settings, provider_set(settings, *providers), commands_recv, speech_send)
        self.nursery = nursery

    async def start(self) -> None:
        await self.nursery.start(self.router.run)

    async def send(self, command, conn: int = 1) -> None:
        await self.commands.send(Envelope(conn, command, trio.current_time()))

    async def receive(self):
        with trio.fail_after(60):  # a deadlock fails the test instead of hanging it
            return await self.speech.receive()

    async def next(self, kind=None, event=None):
        """The next item out of the router (skipping others until one matches): of type
        `kind`, or a Reply/Broadcast carrying an `event` of that type."""
        while True:
            item = await self.receive()
            if kind is not None and not isinstance(item, kind):
                continue
            if event is not None and not (isinstance(item, Reply | Broadcast) and isinstance(item.event, event)):
                continue
            return item


async def test_the_daemon_initializes_itself_and_queues_in_fifo_order(nursery):
    provider = ScriptedProvider()
    provider.gate = trio.Event()
    r = RouterUnderTest(nursery, SETTINGS, provider)
    await r.start()
    assert isinstance((await r.next(Reply | Broadcast)).event, Ready)
    await r.send(SendMessage("First one here."))
    positions = [(await r.next(event=Accepted)).event.position]
    await trio.testing.wait_all_tasks_blocked()  # the first is now speaking (held at the gate)
    for text in ("Second one here.", "Third one here."):
        await r.send(SendMessage(text))
        positions.append((await r.next(event=Accepted)).event.position)
    assert positions == [0, 0, 1]  # the first is already speaking when the others arrive
    provider.gate.set()
    ends = [await r.next(UtteranceEnd) for _ in range(3)]
    assert [e.utterance_id for e in ends] == ["u1", "u2", "u3"] and {e.status for e in ends} == {"ok"}
    assert provider.texts == ["First one here.", "Second one here.", "Third one here."]


async def test_past_max_pending_the_sender_gets_queue_full_and_nothing_changes(nursery):
    provider = ScriptedProvider()
    provider.gate = trio.Event()
    r = RouterUnderTest(nursery, SETTINGS, provider)
    await r.start()
    await r.send(SendMessage("Message number 0."))
    await trio.testing.wait_all_tasks_blocked()
    for i in range(1, 5):
        await r.send(SendMessage(f"Message number {i}."))
    replies = [(await r.next(Reply | Broadcast)) for _ in range(6)][1:]  # after `ready`
    provider.gate.set()
    kinds = [e.event.code if isinstance(e.event, ErrorEvent) else type(e.event).__name__ for e in replies]
    assert kinds == ["Accepted", "Accepted", "Accepted", "Accepted", "queue_full"]
    assert replies[-1].to == 1
    ends = [await r.next(UtteranceEnd) for _ in range(4)]
    assert [e.status for e in ends] == ["ok"] * 4


async def test_switching_provider_while_speaking_applies_to_the_next_utterance(nursery, autojump_clock):
    # Two blocks a second apart: the switch arrives between them, mid-utterance.
    piper = ScriptedProvider(TTSProvider.PIPER, script=lambda text: [tone(2400)] * 2, seconds=1.0)
    kokoros = ScriptedProvider(TTSProvider.KOKOROS, seconds=1.0)
    r = RouterUnderTest(nursery, SETTINGS, piper, kokoros)
    await r.start()
    await r.send(SendMessage("Spoken by piper."))
    begin = await r.next(UtteranceBegin)
    await r.send(SetTTSProvider(TTSProvider.KOKOROS))
    changed = await r.next(event=ProviderChanged)
    await r.send(SendMessage("Spoken by kokoros."))
    ends = [await r.next(UtteranceEnd), await r.next(UtteranceEnd)]
    assert begin.provider == TTSProvider.PIPER and changed.event == ProviderChanged("kokoros")
    assert [e.provider for e in ends] == ["piper", "kokoros"]
    assert piper.texts == ["Spoken by piper."] and kokoros.texts == ["Spoken by kokoros."]


async def test_switching_to_an_unconfigured_provider_is_refused_and_changes_nothing(nursery):
    openai = ScriptedProvider(TTSProvider.OPENAI)
    openai.reason = "OPENAI_API_KEY is not set"
    piper = ScriptedProvider(TTSProvider.PIPER)
    r = RouterUnderTest(nursery, SETTINGS, piper, openai)
    await r.start()
    await r.send(SetTTSProvider(TTSProvider.OPENAI))
    error = (await r.next(event=ErrorEvent)).event
    assert error.code == "provider_unavailable" and "OPENAI_API_KEY" in error.message
    await r.send(SendMessage("Still piper."))
    assert (await r.next(UtteranceEnd)).provider == "piper"


async def test_cancel_stops_the_speaking_utterance_within_100_ms(nursery, autojump_clock):
    provider = ScriptedProvider(script=lambda text: [tone(2400)] * 50, seconds=0.2)
    r = RouterUnderTest(nursery, SETTINGS, provider)
    await r.start()
    await r.send(SendMessage("A long story that takes ten seconds."))
    await r.next(Audio)
    asked_at = trio.current_time()
    await r.send(Cancel())
    items = []
    while not isinstance(item := await r.receive(), UtteranceEnd):
        items.append(item)
    assert item.status == "cancelled"
    assert trio.current_time() - asked_at < 0.1
    assert not any(isinstance(i, Audio) for i in items)
    replies = [i for i in items if isinstance(i, Reply) and isinstance(i.event, Cancelled)]
    reply = replies[0] if replies else await r.next(event=Cancelled)
    assert reply.event == Cancelled(("u1",))


async def test_cancel_all_also_drops_the_queue_each_reported_cancelled(nursery, autojump_clock):
    provider = ScriptedProvider(seconds=5.0)
    r = RouterUnderTest(nursery, SETTINGS, provider)
    await r.start()
    for text in ("One is speaking.", "Two is waiting.", "Three is waiting."):
        await r.send(SendMessage(text))
    await r.next(event=Accepted)
    await r.send(Cancel(all=True))
    ends, replies = [], []
    while len(ends) < 3 or not replies:
        item = await r.receive()
        if isinstance(item, UtteranceEnd):
            ends.append(item)
        elif isinstance(item, Reply) and isinstance(item.event, Cancelled):
            replies.append(item)
    assert sorted(e.utterance_id for e in ends) == ["u1", "u2", "u3"]
    assert {e.status for e in ends} == {"cancelled"}
    assert sorted(replies[0].event.utterance_ids) == ["u1", "u2", "u3"]
    assert provider.texts == ["One is speaking."]


async def test_an_utterance_whose_only_provider_fails_ends_failed_with_an_error(nursery):
    provider = ScriptedProvider(script=lambda text: [ProviderFailed("the server broke")])
    r = RouterUnderTest(nursery, SETTINGS, provider)
    await r.start()
    await r.send(SendMessage("Nothing will come out."))
    error = (await r.next(event=ErrorEvent)).event
    assert error.code == "provider_failed" and error.recovered is False
    assert error.utterance_id == "u1"
    assert (await r.next(UtteranceEnd)).status == "failed"


async def test_failover_mid_utterance_continues_on_the_fallback(nursery):
    settings = dataclasses.replace(SETTINGS, fallback=("piper",), short_first_piece=False)
    calls = []

    def flaky(text):
        calls.append(text)
        return [tone(100)] if len(calls) == 1 else [ProviderFailed("server went away")]

    kokoros = ScriptedProvider(TTSProvider.KOKOROS, script=flaky)
    piper = ScriptedProvider(TTSProvider.PIPER)
    r = RouterUnderTest(nursery, settings, kokoros, piper)
    await r.start()
    await r.send(SetTTSProvider(TTSProvider.KOKOROS))
    await r.send(SendMessage("The first sentence is fine. The second one fails on kokoros. The third one too."))
    error = (await r.next(event=ErrorEvent)).event
    end = await r.next(UtteranceEnd)
    assert error.recovered is True
    assert end.status == "ok"  # every piece was spoken in full, part of it by the fallback
    assert piper.texts and all(t in kokoros.texts for t in piper.texts[:1])


async def test_close_then_send_is_not_initialized_until_initialize(nursery):
    provider = ScriptedProvider()
    r = RouterUnderTest(nursery, SETTINGS, provider)
    await r.start()
    await r.send(Close())
    closed = await r.next(event=Closed)
    assert closed.also_to == 1 and provider.closed == 1
    await r.send(SendMessage("Hello?"))
    assert (await r.next(event=ErrorEvent)).event.code == "not_initialized"
    await r.send(Initialize())
    await r.next(event=Ready)
    await r.send(SendMessage("Hello again."))
    assert (await r.next(UtteranceEnd)).status == "ok"


async def test_a_queued_text_is_reported_before_its_sender_is_told_accepted(nursery):
    # With a broker, on_queued publishes the text for a next speaker: a sender told
    # `accepted` must be able to count on it, even if this speaker dies right after.
    speech_send, speech = trio.open_memory_channel(1000)
    commands, commands_recv = trio.open_memory_channel(100)
    answered_before: list[bool] = []
    called = trio.Event()

    async def on_queued(utt) -> None:
        pending = []
        while True:
            try:
                pending.append(speech.receive_nowait())
            except trio.WouldBlock:
                break
        answered_before.append(any(isinstance(i, Reply) and isinstance(i.event, Accepted) for i in pending))
        called.set()

    router = Router(SETTINGS, provider_set(SETTINGS, ScriptedProvider()), commands_recv, speech_send, on_queued=on_queued)
    await nursery.start(router.run)
    await commands.send(Envelope(1, SendMessage("Remember me."), trio.current_time()))
    with trio.fail_after(60):
        await called.wait()
    assert answered_before == [False]
    with trio.fail_after(60):  # and the answer follows
        while not (isinstance(item := await speech.receive(), Reply) and isinstance(item.event, Accepted)):
            pass
