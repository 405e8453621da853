"""The README's three-shell walkthrough, run for real: `speechcast serve`, `speechcast
listen --out hello.wav --count 1`, `speechcast say "..."` as separate processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import trio

SPEECHCAST = str(Path(sys.executable).parent / "speechcast")
TEXT = "Hello there. This is speechcast, speaking with its embedded voice."


class LineReader:
    """Reads whole lines from a process pipe."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream, self.buffer = stream, b""

    async def line(self) -> str:
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some()
            if not data:
                raise EOFError("the process closed its output")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


async def start_daemon() -> tuple[trio.Process, int]:
    process = await trio.lowlevel.open_process(
        [SPEECHCAST, "serve", "--port", "0", "--http-port", "0"], stdout=subprocess.PIPE
    )
    reader = LineReader(process.stdout)
    while True:
        event = json.loads(await reader.line())
        if event["event"] == "daemon.started":
            return process, event["port"]


async def test_the_readme_walkthrough_writes_seconds_of_speech(tmp_path):
    out = tmp_path / "hello.wav"
    with trio.fail_after(60):
        daemon, port = await start_daemon()
        try:
            url = f"ws://127.0.0.1:{port}"
            listen = await trio.lowlevel.open_process(
                [SPEECHCAST, "listen", "--url", url, "--out", str(out), "--count", "1"], stderr=subprocess.PIPE
            )
            assert (await LineReader(listen.stderr).line()).startswith("listening on")
            said = await trio.run_process([SPEECHCAST, "say", TEXT, "--url", url], capture_stdout=True)
            assert said.stdout.decode().startswith("u1 ok: ")
            assert await listen.wait() == 0
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert await daemon.wait() == 0
    with wave.open(str(out)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 24000)
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.int32)
    assert samples.size / 24000 >= 2.5  # seconds of speech
    # Speech, not silence: most 20 ms windows carry sound well above the noise floor.
    windows = samples[: samples.size // 480 * 480].reshape(-1, 480)
    loud = np.sqrt((windows.astype(np.float64) ** 2).mean(axis=1)) > 500
    assert loud.mean() > 0.5


async def test_say_exits_non_zero_with_a_clear_message_when_no_daemon_runs():
    with trio.fail_after(30):
        result = await trio.run_process(
            [SPEECHCAST, "say", "Anyone there?", "--url", "ws://127.0.0.1:1"], capture_stderr=True, check=False
        )
    assert result.returncode == 1
    assert "is `speechcast serve` running?" in result.stderr.decode()


async def test_say_reports_a_rejected_message_and_exits_non_zero():
    with trio.fail_after(60):
        daemon, port = await start_daemon()
        try:
            result = await trio.run_process(
                [SPEECHCAST, "say", "x" * 4097, "--url", f"ws://127.0.0.1:{port}"], capture_stderr=True, check=False
            )
        finally:
            daemon.send_signal(signal.SIGTERM)
            await daemon.wait()
    assert result.returncode == 1
    assert "text_too_long" in result.stderr.decode()
