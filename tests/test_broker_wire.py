"""The one codec of what crosses the broker (pipeline/broker/wire.py), and the scale-out
deployment files (deploy/docker-compose.scale-out.yml, deploy/Caddyfile). No Redis here:
tests/test_scale_out.py runs the real thing."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import trio
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.broker import wire
from pipeline.broker.items import CommandEntry, HttpAnswer, Queued, RequestKey
from pipeline.commands import Cancel, SendMessage, TextAppend, TTSProvider
from pipeline.events import (
    Accepted,
    Cancelled,
    ErrorCode,
    ErrorEvent,
    Status,
    UtteranceFinished,
    UtteranceStarted,
    VisemeTime,
    Visemes,
    Words,
    WordTime,
)
from pipeline.flow import (
    Broadcast,
    FinishNotice,
    Frame,
    Reply,
    SessionStatus,
    StartNotice,
    TimingNotice,
)
from pipeline.session import SessionState

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"

ITEMS = [
    Frame("u7", 41, True, b"\x00\x01" * 100, encoded={("wav", True): b"x\x9czipped", ("pcm", True): b"\x02raw", ("opus", False): b"\x02\x00ab"}),
    TimingNotice(Words("u7", (WordTime("Hello", 23, 281, 0), WordTime("$29.99", 300, 900, 6)), estimated=False)),
    TimingNotice(Visemes("u7", (VisemeTime("sil", 0, 23), VisemeTime("kk", 23, 58)), estimated=True)),
    Frame("u7", 2**32 - 1, False, b""),
    FinishNotice(UtteranceFinished("u7", Status.PARTIAL, 3, 41, 600, None, 0.12), owner=(5 << 32) + 1, provider="kokoros"),
    Reply((5 << 32) + 9, Accepted("u8", 2)),
    Reply(3, Cancelled(("u1", "u2"))),
    Broadcast(ErrorEvent(ErrorCode.PROVIDER_FAILED, "it stopped", utterance_id="u7", recovered=False), also_to=None),
    SessionStatus(SessionState.CLOSING, TTSProvider.OPENAI),
    HttpAnswer(RequestKey("d1", 4), Accepted("u9", 0, streaming=True)),
    CommandEntry(-((7 << 32) + 1), TextAppend("u9", "more text ", flush=True), 0.0, RequestKey("d1", 4)),
    CommandEntry(None, Cancel(all=True), 0.0),
    Queued("u10", "Spoken by whoever speaks next.", "af_heart", 1.25, TTSProvider.KOKOROS, (3 << 32) + 2, 0.0),
]


@pytest.mark.parametrize("item", ITEMS, ids=lambda item: type(item).__name__)
async def test_every_kind_crosses_the_broker_unchanged(item):
    back = wire.decode(wire.encode(item))
    if hasattr(item, "received_at"):  # (a clock reading crosses as wall-clock time: within a hair)
        assert abs(back.received_at - item.received_at) < 0.05
        back = dataclasses.replace(back, received_at=item.received_at)
    assert back == item


async def test_audio_crosses_as_raw_binary_fields_not_inside_the_json():
    pcm = bytes(range(256)) * 40
    fields = wire.encode(Frame("u1", 0, False, pcm))
    assert pcm in fields.values()
    assert len(fields[wire.ITEM_FIELD]) < 200  # the JSON only points at the field


async def test_times_on_the_trio_clock_cross_as_wall_clock_time():
    received = trio.current_time() - 2.5
    entry = CommandEntry(1, SendMessage("hi", provider=TTSProvider.KOKOROS), received)
    started = StartNotice(UtteranceStarted("u1", "piper", "joe", 24000, 0), owner=1, received_at=received)
    for item in (entry, started):
        fields = wire.encode(item)
        assert "$w" in json.loads(fields[wire.ITEM_FIELD])["f"]["received_at"]
        back = wire.decode(fields)
        assert abs(back.received_at - received) < 0.05
        assert dataclasses.replace(back, received_at=received) == item


async def test_an_entry_naming_a_class_not_listed_is_refused():
    forged = {wire.ITEM_FIELD: b'{"$c":"Popen","f":{"args":"sh"}}'}
    with pytest.raises(wire.WireError, match="unknown kind"):
        wire.decode(forged)
    with pytest.raises(wire.WireError):
        wire.decode({b"nothing": b""})

    @dataclasses.dataclass(frozen=True)
    class NotListed:
        x: int

    with pytest.raises(wire.WireError, match="KINDS"):
        wire.encode(NotListed(1))


# ---------------------------------------------------------------- deploy/


def test_the_scale_out_compose_file_runs_three_daemons_on_one_redis_behind_one_port():
    compose = yaml.safe_load((DEPLOY / "docker-compose.scale-out.yml").read_text())
    services = compose["services"]
    daemons = [name for name in services if name.startswith("speechcast-")]
    assert len(daemons) == 3
    for name in daemons:
        service = services[name]
        assert service["environment"]["SPEECHCAST_BROKER"] == "redis://redis:6379/0"
        assert "ports" not in service  # reached through the proxy only
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "--save" in services["redis"]["command"]
    assert services["proxy"]["ports"] == ["8080:8080"]
    caddyfile = (DEPLOY / "Caddyfile").read_text()
    for name in daemons:
        assert f"{name}:8765" in caddyfile and f"{name}:8766" in caddyfile


@pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy is not installed")
def test_the_caddyfile_is_valid():
    result = subprocess.run(
        ["caddy", "adapt", "--config", str(DEPLOY / "Caddyfile"), "--adapter", "caddyfile"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- the settings


def test_the_broker_setting_takes_a_redis_url_and_never_shows_its_password():
    from pipeline.config import ConfigError, load_settings

    assert load_settings({}, {}).broker is None
    assert load_settings({}, {"SPEECHCAST_BROKER": ""}).broker is None  # empty: a daemon alone
    settings = load_settings({"broker": "redis://:s3cret@10.0.0.5:6379/0", "speaker_lease_s": "2"}, {})
    assert settings.broker == "redis://:s3cret@10.0.0.5:6379/0" and settings.speaker_lease_s == 2.0
    assert "s3cret" not in json.dumps(settings.masked())
    with pytest.raises(ConfigError, match="broker"):
        load_settings({"broker": "10.0.0.5:6379"}, {})
    with pytest.raises(ConfigError, match="speaker_lease_s"):
        load_settings({"speaker_lease_s": "0"}, {})


def test_a_broker_without_the_redis_client_installed_is_a_clear_config_error(monkeypatch, capsys):
    # As after `pip install speechcast` without the `broker` extra.
    import importlib.util

    from pipeline.cli import EXIT_CONFIG, main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "redis" else real(name, *a))
    assert main(["serve", "--broker", "redis://127.0.0.1:6379/0"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "broker" in err and "pip install 'speechcast[broker]'" in err and "Traceback" not in err


# ---------------------------------------------------------------- what a broken or foreign writer leaves

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["$c", "$e", "$b", "$t", "$m", "$w", "f", "v", "x"]) | st.text(max_size=4), inner, max_size=3),
    max_leaves=12,
)
kind_names = st.sampled_from([cls.__name__ for cls in wire.KINDS] + ["Popen", ""])


@st.composite
def entries(draw: st.DrawFn) -> dict[bytes, bytes]:
    fields = draw(st.dictionaries(keys=st.sampled_from([b"0", b"1", b"x"]), values=st.binary(max_size=8), max_size=2))
    if draw(st.booleans()):
        item = {"$c": draw(kind_names), "f": draw(st.dictionaries(st.text(max_size=12), json_values, max_size=4))}
        fields[wire.ITEM_FIELD] = json.dumps(item).encode()
    else:
        fields[wire.ITEM_FIELD] = draw(st.binary(max_size=40) | st.sampled_from([b"[" * 100_000, b'{"$t":' * 50_000]))
    return fields


@settings(max_examples=300, deadline=None)
@given(fields=entries())
async def test_any_entry_decodes_to_an_item_or_a_wire_error(fields):
    # The edge and the speaker skip (and log) a WireError; anything else would end their reader.
    try:
        wire.decode(fields)
    except wire.WireError:
        pass



def with_field(item: object, path: list[str], value: object) -> dict[bytes, bytes]:
    """`item`'s entry with the field at `path` (into nested items) set to the JSON `value`."""
    fields = wire.encode(item)
    plain = json.loads(fields[wire.ITEM_FIELD])
    inner = plain
    for name in path[:-1]:
        inner = inner["f"][name]
    inner["f"][path[-1]] = value
    return {**fields, wire.ITEM_FIELD: json.dumps(plain).encode()}


@pytest.mark.parametrize(
    ("item", "path", "value"),
    [
        (ITEMS[0], ["chunk_id"], "41"),  # the broadcaster packs it into 4 bytes
        (ITEMS[0], ["pcm"], "raw"),  # audio that is text
        (ITEMS[0], ["encoded"], {"$t": []}),  # a tuple where a mapping goes
        (ITEMS[4], ["event", "status"], "partial"),  # not the Status enum
        (ITEMS[4], ["event", "chunks"], 3.5),
        (ITEMS[1], ["event", "words"], {"$t": ["Hello"]}),  # words that are not WordTime
        (ITEMS[10], ["command"], json.loads(wire.encode(Reply(3, Cancelled(("u1",))))[wire.ITEM_FIELD])),  # not a command
        (ITEMS[10], ["conn_id"], "7"),
        (ITEMS[10], ["no_such_field"], 1),
    ],
    ids=["chunk_id", "pcm", "encoded", "status", "chunks", "words", "command", "conn_id", "extra field"],
)
async def test_a_field_of_the_wrong_type_is_refused_not_handed_on(item, path, value):
    # A foreign writer's Frame whose chunk_id is a string would otherwise reach the
    # broadcaster, which counts on a number; the readers skip a WireError and log it.
    with pytest.raises(wire.WireError):
        wire.decode(with_field(item, path, value))



async def test_the_state_hash_reads_back_what_publishing_wrote():
    state: dict[bytes, bytes] = {b"cursor": b"17-0"}
    for item in [Frame("u7", 41, False, b""), HttpAnswer(RequestKey("d1", 4), Accepted("u9", 0)), ITEMS[8]]:
        pairs = wire.state_change(item)
        state.update({str(k).encode(): str(v).encode() for k, v in zip(pairs[::2], pairs[1::2], strict=True)})
    assert wire.read_state(state) == wire.SpeakerState(b"17-0", 41, 9, SessionStatus(SessionState.CLOSING, TTSProvider.OPENAI))


@settings(max_examples=200, deadline=None)
@given(state=st.dictionaries(st.sampled_from([b"cursor", b"chunk", b"utterance", b"session", b"provider", b"x"]), st.binary(max_size=6) | st.sampled_from([b"open", b"piper", b"7"])))
async def test_a_broken_state_hash_reads_as_unknown_values_not_an_exception(state):
    # The next speaker reads it on taking over; an exception there would end its lease loop.
    read = wire.read_state(state)
    assert read.chunk is None or read.chunk == int(state[b"chunk"])
