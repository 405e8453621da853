"""The log catalogue is an interface for monitoring (DESIGN.md section 8): test it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import structlog
import trio
from structlog.testing import capture_logs
from trio_websocket import open_websocket_url

from pipeline.commands import TTSProvider
from pipeline.config import Settings
from pipeline.daemon import running_daemon
from pipeline.errors import ProviderFailed
from tests.support import Heard, ScriptedProvider, finished, of_type, provider_set, receive_until, send


async def test_an_utterance_leaves_the_documented_events_each_with_its_utterance_id():
    settings = dataclasses.replace(Settings(port=0, http_port=0), provider="kokoros", fallback=("piper",), short_first_piece=False)
    kokoros = ScriptedProvider(TTSProvider.KOKOROS, script=lambda text: [ProviderFailed("HTTP 500 with no details")])
    piper = ScriptedProvider(TTSProvider.PIPER)
    with trio.fail_after(30), capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with running_daemon(settings, provider_set(settings, kokoros, piper)) as daemon:
            async with open_websocket_url(f"ws://127.0.0.1:{daemon.port}/") as ws:
                heard = Heard()
                await ws.send_message("{oops")
                await receive_until(ws, heard, of_type("error"))
                await send(ws, type="send_message", text="Logged from start to end.")
                await receive_until(ws, heard, finished())
    by_event = {}
    for line in logs:
        by_event.setdefault(line["event"], []).append(line)
    assert by_event["command.rejected"][0]["code"] == "invalid_json"
    assert by_event["daemon.started"][0]["port"] == daemon.port
    assert by_event["subscriber.connected"] and by_event["subscriber.disconnected"][0]["reason"]
    for event in ("utterance.accepted", "provider.failed", "provider.recovered", "utterance.first_audio", "utterance.finished"):
        assert by_event[event][0]["utterance_id"] == "u1", event
    assert by_event["provider.failed"][0]["provider"] == "kokoros"
    assert by_event["utterance.first_audio"][0]["ttfa_ms"] > 0
    done = by_event["utterance.finished"][0]
    assert done["status"] == "ok" and done["chunks"] > 0 and done["audio_ms"] > 0 and done["rtf"] is not None


def test_log_lines_are_json_with_event_level_and_utc_timestamp():
    script = (
        "from pipeline.logs import configure_logging; import structlog;"
        "configure_logging('json'); structlog.get_logger().info('daemon.started', port=1)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    line = json.loads(out)
    assert line["event"] == "daemon.started" and line["level"] == "info"
    assert line["timestamp"].endswith("Z") and "T" in line["timestamp"]
