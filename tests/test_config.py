"""Settings as an operator meets them: precedence of flags, environment, TOML file and
defaults; a clear refusal (exit code 2, the setting and the value named) for every bad
value; secrets never printed; unknown SPEECHCAST_* variables warned about.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import trio

from pipeline.config import SPECS, ConfigError, Settings, load_settings
from tests.serve_process import SPEECHCAST, serve_process


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `speechcast ARGS` to completion with a clean SPEECHCAST_* environment plus `env`."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SPEECHCAST_") and k != "OPENAI_API_KEY"}
    environ.update(env or {})
    command = [str(SPEECHCAST), *args]
    return subprocess.run(command, capture_output=True, text=True, env=environ, timeout=60, check=False)


@pytest.fixture
def toml_file(tmp_path: Path):
    def write(text: str) -> Path:
        path = tmp_path / "speechcast.toml"
        path.write_text(text)
        return path

    return write


# ---------------------------------------------------------------- precedence


def test_flags_beat_environment_beat_file_beat_defaults(toml_file):
    path = toml_file('port = 1001\nchunk_ms = 300\nkokoros_voice = "am_adam"\nfallback = ["kokoros", "piper"]\n')
    environ = {"SPEECHCAST_PORT": "2002", "SPEECHCAST_CHUNK_MS": "400"}
    settings = load_settings({"port": "3003", "chunk_ms": None}, environ, path)
    assert settings.port == 3003  # flag over environment and file
    assert settings.chunk_ms == 400  # environment over file (the flag was not given)
    assert settings.kokoros_voice == "am_adam"  # file over default
    assert settings.fallback == ("kokoros", "piper")
    assert settings.max_pending == Settings().max_pending == 64  # default


def test_values_are_converted_from_each_source():
    environ = {
        "SPEECHCAST_FALLBACK": "kokoros, piper",
        "SPEECHCAST_SHORT_FIRST_PIECE": "no",
        "SPEECHCAST_SHUTDOWN_GRACE": "2.5",
        "SPEECHCAST_FIRST_CHUNKS_MS": "20,40",
    }
    settings = load_settings({}, environ)
    assert settings.fallback == ("kokoros", "piper")
    assert settings.short_first_piece is False
    assert settings.shutdown_grace == 2.5
    assert settings.first_chunks_ms == (20, 40)


def test_an_empty_fallback_turns_failover_off_and_an_empty_token_means_none():
    settings = load_settings({}, {"SPEECHCAST_FALLBACK": "", "SPEECHCAST_CONTROL_TOKEN": ""})
    assert settings.fallback == ()
    assert settings.control_token is None


def test_every_setting_has_a_default_and_a_flag():
    defaults = {field for field in Settings.__dataclass_fields__} - {"openai_api_key"}
    assert {spec.name for spec in SPECS} == defaults
    result = run_cli("serve", "--help")
    for spec in SPECS:
        assert "--" + spec.name.replace("_", "-") in result.stdout


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--port", "99999"], {}, ["port = '99999'", "--port", "between 0 and 65535"]),
        ([], {"SPEECHCAST_CHUNK_MS": "fast"}, ["chunk_ms = 'fast'", "SPEECHCAST_CHUNK_MS", "whole number"]),
        ([], {"SPEECHCAST_PROVIDER": "espeak"}, ["provider = 'espeak'", "piper, kokoros, openai"]),
        (["--fallback", "kokoros,festival"], {}, ["fallback = 'kokoros,festival'", "festival"]),
        (["--fallback", "piper,piper"], {}, ["fallback = ['piper', 'piper']", "more than once"]),
        (["--provider", "openai"], {}, ["provider = 'openai'", "OPENAI_API_KEY"]),
        ([], {"SPEECHCAST_FALLBACK": "openai"}, ["fallback = ['openai']", "OPENAI_API_KEY"]),
        (["--port", "9000", "--http-port", "9000"], {}, ["http_port = 9000", "9000"]),
        (["--kokoros-url", "kokoros:3000"], {}, ["kokoros_url = 'kokoros:3000'", "http://"]),
        (["--log-format", "xml"], {}, ["log_format = 'xml'", "json, console"]),
        (["--shutdown-grace", "-1"], {}, ["shutdown_grace = '-1'", "0 or more"]),
        ([], {"SPEECHCAST_SHORT_FIRST_PIECE": "maybe"}, ["short_first_piece = 'maybe'", "true or false"]),
    ],
)
def test_serve_refuses_a_bad_setting_with_exit_code_2_naming_it(args, env, named):
    result = run_cli("serve", *args, env=env)
    assert result.returncode == 2
    for text in named:
        assert text in result.stderr
    assert result.stdout == ""  # nothing was started, nothing was logged


def test_a_bad_toml_file_is_refused(toml_file):
    broken = toml_file("port = \n")
    result = run_cli("serve", "--config", str(broken))
    assert result.returncode == 2
    assert "is not valid TOML" in result.stderr and str(broken) in result.stderr


def test_a_toml_file_with_a_typo_or_a_bad_value_is_refused(toml_file):
    typo = toml_file("prot = 8765\n")
    result = run_cli("serve", "--config", str(typo))
    assert result.returncode == 2 and "unknown setting(s) prot" in result.stderr
    bad = toml_file("max_pending = 0\n")
    result = run_cli("serve", "--config", str(bad))
    assert result.returncode == 2 and f"max_pending = 0 (from {bad})" in result.stderr


def test_a_missing_config_file_and_a_key_in_the_file_are_refused(tmp_path, toml_file):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings({}, {}, tmp_path / "nowhere.toml")
    with pytest.raises(ConfigError, match="OPENAI_API_KEY only"):
        load_settings({}, {}, toml_file('openai_api_key = "sk-in-a-file"\n'))


# ---------------------------------------------------------------- printing, secrets


def test_config_print_shows_the_effective_settings_as_json_with_secrets_masked(toml_file):
    path = toml_file('chunk_ms = 250\nkokoros_url = "http://speech:hunter2@kokoros:3000"\n')
    secrets = {
        "OPENAI_API_KEY": "sk-test-do-not-print",
        "SPEECHCAST_CONTROL_TOKEN": "control-do-not-print",
        "SPEECHCAST_LISTEN_TOKEN": "listen-do-not-print",
    }
    result = run_cli("config", "--print", "--config", str(path), "--port", "9999", env=secrets)
    assert result.returncode == 0
    printed = json.loads(result.stdout)
    assert printed["port"] == 9999 and printed["chunk_ms"] == 250
    assert printed["fallback"] == ["piper"]
    assert printed["openai_api_key"] == printed["control_token"] == printed["listen_token"] == "***"
    assert printed["kokoros_url"] == "http://speech:***@kokoros:3000"
    for secret in [*secrets.values(), "hunter2"]:
        assert secret not in result.stdout and secret not in result.stderr
    assert set(printed) == {spec.name for spec in SPECS} | {"openai_api_key"}


def test_config_print_shows_unset_secrets_as_null():
    printed = json.loads(run_cli("config", "--print").stdout)
    assert printed["openai_api_key"] is None and printed["control_token"] is None


def test_secrets_stay_out_of_repr():
    settings = Settings(control_token="c-secret", listen_token="l-secret", openai_api_key="sk-secret")
    assert "secret" not in repr(settings)


# ---------------------------------------------------------------- unknown variables


def test_unknown_speechcast_variables_are_reported_and_ignored():
    warned = []
    environ = {"SPEECHCAST_PORTT": "1", "SPEECHCAST_PORT": "1234"}
    settings = load_settings({}, environ, warn=lambda event, name: warned.append((event, name)))
    assert settings.port == 1234
    assert warned == [("config.unknown_variable", "SPEECHCAST_PORTT")]
    result = run_cli("config", "--print", env={"SPEECHCAST_PORTT": "1"})
    assert result.returncode == 0 and "unknown variable SPEECHCAST_PORTT ignored" in result.stderr


async def test_serve_logs_a_warning_for_an_unknown_variable_and_still_starts():
    with trio.fail_after(30):
        async with serve_process(env={"SPEECHCAST_CHUNKMS": "100"}) as daemon:
            daemon.signal(signal.SIGTERM)
            assert await daemon.exit_code() == 0
    [warning] = daemon.logged("config.unknown_variable")
    assert warning["variable"] == "SPEECHCAST_CHUNKMS" and warning["level"] == "warning"
