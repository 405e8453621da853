"""Who may connect, listen and command, and how often (DESIGN.md section 7, docs/access.md):
tokens, origins, the connection limit, the client frame limit, the command rate limit and
the keep-alive that drops dead peers.

The rules themselves are tested without sockets (MockClock for time); the daemon tests
use real WebSockets on loopback, port 0, with `trio.fail_after` around all I/O.
"""

from __future__ import annotations

import dataclasses

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from actors.websocket import keep_alive
from pipeline.access import (
    ConnectionSlots,
    Grant,
    HandshakeError,
    TokenBucket,
    admit,
    grant_for,
)
from pipeline.config import Settings
from pipeline.daemon import running_daemon
from tests.support import (
    Heard,
    ScriptedProvider,
    finished,
    of_type,
    provider_set,
    receive_until,
    send,
    ws_url,
)
from tests.test_slow_subscribers import never_reading_client

BASE = Settings(port=0, http_port=0)
CONTROL = "control-secret-7f3a"
LISTEN = "listen-secret-91bc"


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


# ---------------------------------------------------------------- the rules, no sockets


@pytest.mark.parametrize(
    ("control", "listen", "token", "expected"),
    [
        (None, None, None, Grant(listen=True, control=True)),
        (None, None, "anything", Grant(listen=True, control=True)),  # nothing to check against
        (CONTROL, None, None, Grant(listen=True, control=False)),
        (CONTROL, None, CONTROL, Grant(listen=True, control=True)),
        (CONTROL, None, "wrong", 401),
        (None, LISTEN, None, 401),
        (None, LISTEN, "wrong", 401),
        (None, LISTEN, LISTEN, Grant(listen=True, control=True)),  # no control token: commands open
        (CONTROL, LISTEN, None, 401),
        (CONTROL, LISTEN, LISTEN, Grant(listen=True, control=False)),
        (CONTROL, LISTEN, CONTROL, Grant(listen=True, control=True)),
        (CONTROL, LISTEN, CONTROL + "x", 401),
        ("", "", None, Grant(listen=True, control=True)),  # empty settings = not configured
    ],
)
def test_what_each_token_grants(control, listen, token, expected):
    settings = dataclasses.replace(BASE, control_token=control, listen_token=listen)
    if isinstance(expected, int):
        with pytest.raises(HandshakeError) as refused:
            grant_for(settings, token)
        assert refused.value.status == expected
        assert token is None or token not in refused.value.message
    else:
        assert grant_for(settings, token) == expected


def test_the_token_may_come_as_a_bearer_header_but_not_as_two_different_tokens():
    settings = dataclasses.replace(BASE, control_token=CONTROL, listen_token=LISTEN)
    assert admit(settings, None, bearer(CONTROL)).control
    assert admit(settings, CONTROL, bearer(CONTROL)).control
    with pytest.raises(HandshakeError) as refused:
        admit(settings, LISTEN, bearer(CONTROL))
    assert refused.value.status == 400
    with pytest.raises(HandshakeError):
        admit(settings, None, [(b"authorization", b"Basic " + CONTROL.encode())])


@pytest.mark.parametrize(
    ("allowed", "origin", "admitted"),
    [
        ((), "https://anywhere.example", True),
        (("https://app.example",), None, True),  # no Origin: not a browser
        (("https://app.example",), "https://app.example", True),
        (("https://app.example",), "HTTPS://APP.EXAMPLE/", True),
        (("https://app.example",), "https://evil.example", False),
        (("https://app.example",), "null", False),
    ],
)
def test_origins(allowed, origin, admitted):
    settings = dataclasses.replace(BASE, allowed_origins=allowed)
    headers = [] if origin is None else [(b"origin", origin.encode())]
    if admitted:
        admit(settings, None, headers)
    else:
        with pytest.raises(HandshakeError) as refused:
            admit(settings, None, headers)
        assert refused.value.status == 403


async def test_the_token_bucket_allows_a_burst_then_the_sustained_rate(autojump_clock):
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_seconds() == 0.5
    await trio.sleep(bucket.wait_seconds())
    assert [bucket.take(), bucket.take()] == [True, False]
    await trio.sleep(60)  # a long pause refills only up to the burst
    assert sum(bucket.take() for _ in range(10)) == 3


def test_connection_slots_refuse_past_the_limit_and_free_on_give_back():
    slots = ConnectionSlots(2)
    assert [slots.take(), slots.take(), slots.take()] == [True, True, False]
    slots.give_back()
    assert slots.take()


class FakePeer:
    """A connection whose pongs arrive when `answering`, and never otherwise."""

    def __init__(self, answering: bool) -> None:
        self.answering = answering
        self.pings = 0

    async def ping(self) -> None:
        self.pings += 1
        if not self.answering:
            await trio.sleep_forever()


async def test_keep_alive_gives_up_on_a_peer_that_does_not_pong(autojump_clock):
    peer = FakePeer(answering=False)
    started = trio.current_time()
    reason = await keep_alive(peer, interval=20, timeout=10)
    assert reason == "no pong within 10 s"
    assert trio.current_time() - started == pytest.approx(30)
    assert peer.pings == 1


async def test_keep_alive_keeps_an_answering_peer(autojump_clock):
    peer = FakePeer(answering=True)
    with trio.move_on_after(1005) as waited:
        await keep_alive(peer, interval=20, timeout=10)
    assert waited.cancelled_caught
    assert peer.pings == 50


# ---------------------------------------------------------------- the daemon, on loopback


async def refused_status(address: str, headers: list[tuple[bytes, bytes]] | None = None) -> int:
    with pytest.raises(ConnectionRejected) as refused:
        async with open_websocket_url(address, extra_headers=headers):
            pass
    return refused.value.status_code


async def test_listen_token_required_to_connect_and_bearer_works():
    settings = dataclasses.replace(BASE, listen_token=LISTEN)
    with trio.fail_after(30), capture_logs() as logs:
        async with running_daemon(settings, provider_set(settings, ScriptedProvider())) as daemon:
            assert await refused_status(ws_url(daemon.port)) == 401
            assert await refused_status(ws_url(daemon.port, "?token=wrong")) == 401
            assert await refused_status(ws_url(daemon.port), bearer("wrong")) == 401
            async with open_websocket_url(ws_url(daemon.port), extra_headers=bearer(LISTEN)) as ws:
                heard = Heard()
                await receive_until(ws, heard, of_type("hello"))
                # Without a control token configured, a valid listen token may command too.
                await send(ws, type="send_message", text="Hello.")
                assert (await receive_until(ws, heard, finished()))["status"] == "ok"
                assert heard.frames
    assert not [e for e in logs if LISTEN in repr(e) or "wrong" in repr(e)], "a token reached the log"


async def test_without_the_control_token_commands_are_unauthorized_but_listening_works():
    settings = dataclasses.replace(BASE, control_token=CONTROL, listen_token=LISTEN)
    provider = ScriptedProvider()
    with trio.fail_after(30), capture_logs() as logs:
        async with running_daemon(settings, provider_set(settings, provider)) as daemon:
            async with open_websocket_url(ws_url(daemon.port, f"?token={LISTEN}")) as listener, open_websocket_url(
                ws_url(daemon.port, "?subscribe=0"), extra_headers=bearer(CONTROL)
            ) as control:
                heard, heard_control = Heard(), Heard()
                await receive_until(listener, heard, of_type("hello"))
                for command in ("initialize", "send_message", "set_tts_provider", "close", "cancel", "tts"):
                    await send(listener, type=command, text="Let me speak.", provider="piper")
                    assert (await receive_until(listener, heard, of_type("error")))["code"] == "unauthorized"
                await send(control, type="send_message", text="Only the controller speaks.")
                await receive_until(control, heard_control, finished())
                done = await receive_until(listener, heard, finished())
    assert done["status"] == "ok" and heard.frames  # the listener still heard it all
    assert provider.texts == ["Only the controller speaks."]
    assert not [e for e in logs if CONTROL in repr(e) or LISTEN in repr(e)], "a token reached the log"


async def test_with_only_a_control_token_anyone_listens_and_a_wrong_token_is_refused():
    settings = dataclasses.replace(BASE, control_token=CONTROL)
    with trio.fail_after(30):
        async with running_daemon(settings, provider_set(settings, ScriptedProvider())) as daemon:
            assert await refused_status(ws_url(daemon.port, "?token=guess")) == 401
            async with open_websocket_url(ws_url(daemon.port)) as anyone, open_websocket_url(
                ws_url(daemon.port, f"?token={CONTROL}&subscribe=0")
            ) as control:
                heard, heard_control = Heard(), Heard()
                await send(anyone, type="initialize")
                assert (await receive_until(anyone, heard, of_type("error")))["code"] == "unauthorized"
                await send(control, type="send_message", text="Public announcement.")
                await receive_until(control, heard_control, finished())
                assert (await receive_until(anyone, heard, finished()))["status"] == "ok"
                assert heard.frames


async def test_a_browser_from_another_origin_is_refused_with_403():
    settings = dataclasses.replace(BASE, allowed_origins=("http://127.0.0.1:8766",))
    with trio.fail_after(30):
        async with running_daemon(settings, provider_set(settings, ScriptedProvider())) as daemon:
            assert await refused_status(ws_url(daemon.port), [(b"origin", b"https://evil.example")]) == 403
            async with open_websocket_url(ws_url(daemon.port), extra_headers=[(b"origin", b"http://127.0.0.1:8766")]) as ws:
                await receive_until(ws, Heard(), of_type("hello"))
            async with open_websocket_url(ws_url(daemon.port)) as ws:  # no Origin: not a browser
                await receive_until(ws, Heard(), of_type("hello"))


async def test_past_max_connections_the_handshake_gets_503_until_one_leaves():
    settings = dataclasses.replace(BASE, max_connections=2)
    with trio.fail_after(30):
        async with running_daemon(settings, provider_set(settings, ScriptedProvider())) as daemon:
            async with open_websocket_url(ws_url(daemon.port)) as one:
                await receive_until(one, Heard(), of_type("hello"))
                async with open_websocket_url(ws_url(daemon.port)) as two:
                    await receive_until(two, Heard(), of_type("hello"))
                    assert await refused_status(ws_url(daemon.port)) == 503
                    await send(one, type="set_tts_provider", provider="piper")  # the others are unaffected
                    await receive_until(one, Heard(), of_type("provider_changed"))
                # Once the daemon has finished with the closed connection, its slot is free.
                await trio.testing.wait_all_tasks_blocked()
                async with open_websocket_url(ws_url(daemon.port)) as three:
                    await receive_until(three, Heard(), of_type("hello"))
                    assert await refused_status(ws_url(daemon.port)) == 503


async def test_a_client_frame_over_64_kib_closes_that_connection_with_1009():
    provider = ScriptedProvider()
    with trio.fail_after(30):
        async with running_daemon(BASE, provider_set(BASE, provider)) as daemon:
            async with open_websocket_url(ws_url(daemon.port)) as other:
                async with open_websocket_url(ws_url(daemon.port)) as ws:
                    await receive_until(ws, Heard(), of_type("hello"))
                    await ws.send_message("x" * (BASE.max_message_size + 1))
                    with pytest.raises(ConnectionClosed) as closed:
                        while True:
                            await ws.get_message()
                    assert closed.value.reason.code == 1009
                heard = Heard()
                await send(other, type="send_message", text="Everyone else carries on.")
                assert (await receive_until(other, heard, finished()))["status"] == "ok"
                # A frame just under the limit is an ordinary (here: invalid) message.
                await other.send_message("y" * (BASE.max_message_size - 1))
                assert (await receive_until(other, heard, of_type("error")))["code"] == "invalid_json"


async def test_commands_past_the_rate_limit_get_rate_limited_then_pass_again():
    # One command per second, bursts of two: a stall long enough to refill one token
    # between two back-to-back sends would take a whole second.
    settings = dataclasses.replace(BASE, rate_limit=1.0, rate_burst=2)
    with trio.fail_after(30), capture_logs() as logs:
        async with running_daemon(settings, provider_set(settings, ScriptedProvider())) as daemon:
            async with open_websocket_url(ws_url(daemon.port)) as ws, open_websocket_url(ws_url(daemon.port)) as other:
                heard = Heard()
                for _ in range(4):
                    await send(ws, type="set_tts_provider", provider="piper")
                answers = [await receive_until(ws, heard, lambda e: e["type"] in ("provider_changed", "error")) for _ in range(4)]
                # Refusals come straight from intake, so they may overtake earlier answers.
                refusals = [a for a in answers if a["type"] == "error"]
                assert sorted(a["type"] for a in answers) == ["error", "error", "provider_changed", "provider_changed"]
                assert {a["code"] for a in refusals} == {"rate_limited"}
                # The limit is per connection: another one is not affected.
                await send(other, type="set_tts_provider", provider="piper")
                await receive_until(other, Heard(), of_type("provider_changed"))
                # A client that waits as long as it was told gets through again.
                await trio.sleep(max(a["retry_after"] for a in refusals))
                await send(ws, type="set_tts_provider", provider="piper")
                assert (await receive_until(ws, heard, lambda e: e["type"] in ("provider_changed", "error")))[
                    "type"
                ] == "provider_changed"
    rejected = [e for e in logs if e["event"] == "command.rejected" and e["code"] == "rate_limited"]
    assert len(rejected) == 1  # one log line per run of refusals


async def test_a_peer_that_stops_answering_pings_is_closed_and_others_stay():
    settings = dataclasses.replace(BASE, ping_interval=0.2, ping_timeout=0.3, close_timeout=0.5)
    with trio.fail_after(30), capture_logs() as logs:
        async with running_daemon(settings, provider_set(settings, ScriptedProvider())) as daemon:
            async with open_websocket_url(ws_url(daemon.port)) as healthy:
                await receive_until(healthy, Heard(), of_type("hello"))
                dead = await never_reading_client(daemon.port)
                # The daemon closes the dead peer's TCP connection: read until its end.
                while await dead.receive_some(65536):
                    pass
                await dead.aclose()
                await trio.testing.wait_all_tasks_blocked()
                # The healthy client answered its pings all along and is still served.
                await send(healthy, type="set_tts_provider", provider="piper")
                await receive_until(healthy, Heard(), of_type("provider_changed"))
    gone = [e["reason"] for e in logs if e["event"] == "subscriber.disconnected"]
    assert gone == ["no pong within 0.3 s", "closed by client"]  # the healthy one left at the end
