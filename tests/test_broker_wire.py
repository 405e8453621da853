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
)
from pipeline.flow import (
    Broadcast,
    FinishNotice,
    Frame,
    Reply,
    SessionStatus,
    StartNotice,
)
from pipeline.session import SessionState

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"

ITEMS = [
    Frame("u7", 41, True, b"\x00\x01" * 100, encoded={("wav", True): b"x\x9czipped", ("pcm", True): b"\x02raw"}),
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
