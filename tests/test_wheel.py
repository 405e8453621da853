"""The installed package is the product: the wheel built with `python -m build`, installed
(non-editable, with its dependencies) into a fresh virtualenv, serves the web page and runs
the README walkthrough, with nothing imported from this checkout.

Slow next to the rest (about 40 s: building, then pip installing the dependencies from its
cache), so marked `wheel` (`pytest -m wheel` runs only these); it stays in `make test`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import wave
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import trio

from tests.serve_process import ServeProcess

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parent.parent
TEXT = "Hello there. This is speechcast, speaking with its embedded voice."
# What the build must not see: the checkout's own venv, earlier builds, caches.
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "*.wav"
)
BUILD_TIMEOUT_S = 180
# pip's cache makes it ~30 s; a cold cache downloads onnxruntime, numpy and the voice.
INSTALL_TIMEOUT_S = 600


class Installed:
    """A fresh virtualenv holding only the wheel (and its dependencies)."""

    def __init__(self, wheel: Path, venv: Path, outside: Path) -> None:
        self.wheel, self.venv, self.outside = wheel, venv, outside
        self.bin = venv / "bin"
        # Nothing from this test run may leak into the venv's processes: PYTHONPATH (the
        # checkout, when the suite runs with it), this venv, settings for the daemon.
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith("SPEECHCAST_")
        }


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    """Build the wheel from a copy of the checkout (so the build leaves nothing in it) and
    install it into a new venv: no --system-site-packages, no editable install."""
    base = tmp_path_factory.mktemp("wheel")
    source, dist, venv, outside = base / "source", base / "dist", base / "venv", base / "elsewhere"
    # symlinks=True keeps pipeline/web a link to web/, as in the checkout.
    shutil.copytree(ROOT, source, symlinks=True, ignore=NOT_SOURCES)
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(source)],
        check=True, capture_output=True, timeout=BUILD_TIMEOUT_S,
    )  # fmt: skip
    [wheel] = dist.glob("speechcast-*.whl")
    # No pip inside the new venv: this venv's pip installs into it (`pip --python`), which
    # skips seeding pip and leaves the new venv with the wheel and its dependencies only.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet", str(wheel)],
        check=True, capture_output=True, timeout=INSTALL_TIMEOUT_S,
    )  # fmt: skip
    outside.mkdir()
    return Installed(wheel, venv, outside)


def test_the_wheel_carries_the_code_and_the_web_client_and_nothing_else(installed):
    names = zipfile.ZipFile(installed.wheel).namelist()
    web = sorted(p.name for p in (ROOT / "web").iterdir() if p.is_file())
    assert sorted(n.removeprefix("pipeline/web/") for n in names if n.startswith("pipeline/web/")) == web
    assert "pipeline/cli.py" in names and "actors/http_face.py" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "web/"))]


def test_the_installed_package_is_imported_from_the_venv_not_the_checkout(installed):
    code = "import pipeline, actors.http_face as h; print(pipeline.__file__); print(h.WEB_ROOT)"
    result = subprocess.run(
        [str(installed.bin / "python"), "-c", code],
        cwd=installed.outside, env=installed.env, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    module, web_root = (Path(line).resolve() for line in result.stdout.splitlines())
    assert module.is_relative_to(installed.venv.resolve())
    assert web_root.is_relative_to(installed.venv.resolve()) and (web_root / "index.html").is_file()


async def read_line(stream: trio.abc.ReceiveStream) -> str:
    """One line of a process pipe (byte by byte: the rest is not read here)."""
    line = b""
    while not line.endswith(b"\n"):
        data = await stream.receive_some(1)
        if not data:
            raise EOFError(f"the process closed its output after {line!r}")
        line += data
    return line.decode()


async def test_the_installed_daemon_serves_the_web_page_and_speaks_the_walkthrough(installed):
    speechcast = str(installed.bin / "speechcast")
    out = installed.outside / "hello.wav"

    async def run(*args: str, **kwargs) -> subprocess.CompletedProcess[bytes]:
        return await trio.run_process([speechcast, *args], cwd=installed.outside, env=installed.env, **kwargs)

    with trio.fail_after(90):
        process = await trio.lowlevel.open_process(
            [speechcast, "serve", "--port", "0", "--http-port", "0"],
            cwd=installed.outside, env=installed.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        daemon = ServeProcess(process)
        try:
            started = await daemon.next_event("daemon.started")
            url = f"ws://127.0.0.1:{started['port']}"
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{started['http_port']}") as http:
                page, player = await http.get("/"), await http.get("/player.js")
            assert page.status_code == 200 and "<title>speechcast" in page.text
            assert player.status_code == 200
            assert player.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript")

            listen = await trio.lowlevel.open_process(
                [speechcast, "listen", "--url", url, "--out", str(out), "--count", "1"],
                cwd=installed.outside, env=installed.env, stderr=subprocess.PIPE,
            )  # fmt: skip
            try:
                assert (await read_line(listen.stderr)).startswith("listening on")
                said = await run("say", TEXT, "--url", url, capture_stdout=True, capture_stderr=True, check=False)
                assert said.returncode == 0, said.stderr.decode()
                assert said.stdout.decode().startswith("u1 ok: ")
                assert await listen.wait() == 0
            finally:
                if listen.returncode is None:
                    listen.kill()
                    await listen.wait()
            daemon.signal(signal.SIGTERM)
            assert await daemon.exit_code() == 0
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
    with wave.open(str(out)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 24000)
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    assert samples.size / 24000 >= 2.5  # seconds of speech
    assert np.abs(samples.astype(np.int32)).max() > 1000  # sound, not silence
