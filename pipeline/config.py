"""Settings: one table of names, defaults and checks, read from flags, environment and TOML.

Precedence is flags > environment (`SPEECHCAST_SOME_NAME`) > the `--config` TOML file
(flat top-level keys) > defaults. Every value is validated at start; a bad one raises
`ConfigError` naming the setting and the value, and `speechcast serve` exits with 2.
(Over 300 lines on purpose: the whole settings table, its checks and its loader stay in
one place, which is what lets deploy/speechcast.toml and the flags be checked against it.)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import ipaddress
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipeline.commands import TTSProvider

ENV_PREFIX = "SPEECHCAST_"
# The ecosystem's usual name for the key; it is read from the environment only.
API_KEY_ENV = "OPENAI_API_KEY"
SECRET_NAMES = frozenset({"control_token", "listen_token", "openai_api_key"})


class ConfigError(ValueError):
    """A setting with a value that cannot be used; the message names both."""


def _port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else "must be between 0 and 65535"


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must be 0 or more"


def _between(lo: float, hi: float) -> Callable[[float], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}"


def _provider(v: str) -> str | None:
    names = [p.value for p in TTSProvider]
    return None if v in names else f"must be one of {', '.join(names)}"


def _providers(v: list[str]) -> str | None:
    bad = [p for p in v if _provider(p)]
    return f"unknown provider(s) {', '.join(bad)}; use piper, kokoros, openai" if bad else None


def _one_of(*choices: str) -> Callable[[str], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


# What the `broker` extra installs (setup.cfg); a daemon alone never imports them.
BROKER_MODULES = ("redis", "typeguard")


def _non_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _url(v: str) -> str | None:
    return None if v.startswith(("http://", "https://")) else "must start with http:// or https://"


def _broker_url(v: str) -> str | None:
    if not v.startswith(("redis://", "rediss://", "unix://")):
        return "must be a Redis URL: redis://HOST:PORT/DB (or rediss:// or unix://)"
    missing = [name for name in BROKER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        return f"needs {' and '.join(missing)}, which this install lacks: pip install 'speechcast[broker]'"
    return None


def _chunk_steps(v: list[str]) -> str | None:
    try:
        ok = all(int(x) > 0 for x in v)
    except ValueError:
        ok = False
    return None if ok else "must be a list of positive whole milliseconds, e.g. 40,80,160"


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    kind: type
    help: str
    check: Callable[[Any], str | None] | None = None


SPECS: tuple[Spec, ...] = (
    Spec("host", str, "address to listen on (WebSocket and HTTP)", _non_empty),
    Spec("port", int, "WebSocket port (0 = any free port)", _port),
    Spec("http_port", int, "HTTP port for health, metrics, /v1/speak and the web page", _port),
    Spec("provider", str, "provider at start: piper, kokoros or openai", _provider),
    Spec("fallback", list, "providers tried, in order, after the speaking one fails", _providers),
    Spec("sample_rate", int, "rate of all audio sent to subscribers (Hz)", _between(8000, 48000)),
    Spec("chunk_ms", int, "duration of an audio chunk once an utterance is under way", _between(10, 5000)),
    Spec("first_chunks_ms", list, "shorter first chunks of an utterance, so chunking never holds back first audio", _chunk_steps),
    Spec("short_first_piece", bool, "speak the first clause on its own so first audio needs only a few words"),
    Spec("opus_bitrate", int, "bits per second of the Opus stream sent to format=opus subscribers", _between(6000, 510000)),
    Spec("lookahead", int, "pieces synthesized ahead of the one streaming out", _between(0, 8)),
    Spec("max_pending", int, "utterances that may wait in the queue", _between(1, 100000)),
    Spec("stream_idle_flush_s", float, "seconds without new text before a streamed utterance's held tail is spoken", _positive),
    Spec("stream_idle_end_s", float, "seconds without new text before a streamed utterance ends by itself", _positive),
    Spec("max_stream_chars", int, "characters one streamed utterance may receive in all", _between(1, 10_000_000)),
    Spec("max_connections", int, "WebSocket connections at once", _between(1, 1000000)),
    Spec("shutdown_grace", float, "seconds the speaking utterance may finish after SIGTERM", _non_negative),
    Spec("control_token", str, "token needed to send commands (secret)"),
    Spec("listen_token", str, "token needed to subscribe (secret)"),
    Spec("allowed_origins", list, "browser origins allowed to connect (empty = any)"),
    Spec("log_format", str, "json (for machines) or console (for people)", _one_of("json", "console")),
    Spec("subscriber_queue_bytes", int, "bytes queued for one subscriber before it is dropped as too slow", _positive),
    Spec("max_message_size", int, "largest client frame in bytes; larger closes with 1009", _positive),
    Spec("rate_limit", float, "commands per second one connection may send (sustained)", _positive),
    Spec("rate_burst", int, "commands one connection may send in a burst", _positive),
    Spec("ping_interval", float, "seconds between keep-alive pings", _positive),
    Spec("ping_timeout", float, "seconds to wait for a pong before dropping a peer", _positive),
    Spec("close_timeout", float, "seconds to wait for a close handshake", _positive),
    Spec("broker", str, "Redis URL shared by several daemons serving one audience (docs/scale-out.md); empty = one daemon alone", _broker_url),
    Spec("speaker_lease_s", float, "seconds the speaker's lease in the broker lasts without renewal", _between(0.5, 60)),
    Spec("kokoros_url", str, "base URL of the Kokoros (or Kokoro-FastAPI) server", _url),
    Spec("kokoros_voice", str, "Kokoros voice"),
    Spec("kokoros_model", str, "Kokoros model name"),
    Spec("kokoros_speed", float, "Kokoros speaking speed", _between(0.25, 4.0)),
    Spec("openai_url", str, "base URL of the OpenAI speech API", _url),
    Spec("openai_voice", str, "OpenAI voice"),
    Spec("openai_model", str, "OpenAI speech model"),
    Spec("openai_speed", float, "OpenAI speaking speed", _between(0.25, 4.0)),
    Spec("piper_speed", float, "embedded voice speaking speed", _between(0.25, 4.0)),
    Spec("piper_workers", int, "worker processes of the embedded voice (pieces synthesized at once)", _between(1, 64)),
    Spec("piper_worker_memory_mb", int, "address-space bound of one embedded-voice worker (MB)", _between(256, 1048576)),
    Spec("connect_timeout", float, "seconds to connect to an HTTP provider", _positive),
    Spec("first_byte_timeout", float, "seconds to wait for the first audio byte", _positive),
    Spec("stall_timeout", float, "seconds without a byte before a stream counts as stalled", _positive),
    Spec("max_retries", int, "retries of a failed HTTP request before any of its audio was sent", _between(0, 10)),
    Spec("retry_after_cap", float, "longest Retry-After honoured (seconds)", _non_negative),
    Spec("http_parallel", int, "requests one HTTP provider may have in flight", _between(1, 64)),
    Spec("breaker_failures", int, "failures in a row that open a provider's circuit", _between(1, 1000)),
    Spec("breaker_cooldown", float, "seconds a provider with an open circuit is skipped", _non_negative),
    Spec("piece_timeout", float, "seconds any provider may take for one piece, plus the per-character part", _positive),
    Spec("piece_timeout_per_char", float, "seconds added to piece_timeout per character of the piece (more below speed 1)", _non_negative),
    Spec("max_audio_base", float, "seconds of audio any piece may have, plus the per-character part (over speed)", _positive),
    Spec("max_audio_per_char", float, "seconds of audio allowed per character of a piece; more is cut off", _positive),
)
SPECS_BY_NAME = {s.name: s for s in SPECS}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The effective settings of one daemon (see SPECS for meaning and defaults)."""

    host: str = "127.0.0.1"
    port: int = 8765
    http_port: int = 8766
    provider: str = "piper"
    fallback: tuple[str, ...] = ("piper",)
    sample_rate: int = 24000
    chunk_ms: int = 200
    first_chunks_ms: tuple[int, ...] = (40, 80, 160)
    short_first_piece: bool = True
    opus_bitrate: int = 32000
    lookahead: int = 1
    max_pending: int = 64
    stream_idle_flush_s: float = 1.0
    stream_idle_end_s: float = 30.0
    max_stream_chars: int = 100_000
    max_connections: int = 4096
    shutdown_grace: float = 5.0
    control_token: str | None = dataclasses.field(default=None, repr=False)
    listen_token: str | None = dataclasses.field(default=None, repr=False)
    allowed_origins: tuple[str, ...] = ()
    log_format: str = "json"
    subscriber_queue_bytes: int = 4 * 1024 * 1024
    max_message_size: int = 65536
    rate_limit: float = 20.0
    rate_burst: int = 40
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    close_timeout: float = 5.0
    broker: str | None = None
    speaker_lease_s: float = 3.0
    kokoros_url: str = "http://127.0.0.1:3000"
    kokoros_voice: str = "af_heart"
    kokoros_model: str = "kokoro"
    kokoros_speed: float = 1.0
    openai_url: str = "https://api.openai.com"
    openai_voice: str = "alloy"
    openai_model: str = "gpt-4o-mini-tts"
    openai_speed: float = 1.0
    piper_speed: float = 1.0
    piper_workers: int = 2
    piper_worker_memory_mb: int = 2048
    connect_timeout: float = 3.0
    first_byte_timeout: float = 15.0
    stall_timeout: float = 5.0
    max_retries: int = 2
    retry_after_cap: float = 10.0
    http_parallel: int = 2
    breaker_failures: int = 3
    breaker_cooldown: float = 30.0
    piece_timeout: float = 20.0
    piece_timeout_per_char: float = 0.2
    max_audio_base: float = 5.0
    max_audio_per_char: float = 1.0
    openai_api_key: str | None = dataclasses.field(default=None, repr=False)

    def masked(self) -> dict[str, Any]:
        """The settings as plain values with every secret (and URL password) replaced by '***'."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in SECRET_NAMES and value:
                value = "***"
            elif (field.name.endswith("_url") or field.name == "broker") and value:
                value = _mask_url(value)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    def is_public_without_tokens(self) -> bool:
        """True when listening beyond loopback with no token at all (worth a warning)."""
        if self.control_token or self.listen_token:
            return False
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host != "localhost"


def _convert(spec: Spec, raw: Any, source: str) -> Any:
    """Turn a raw value (string from env/flags, or a TOML value) into the spec's type."""
    where = f"{spec.name} = {raw!r} ({source})"
    try:
        if spec.kind is list:
            if isinstance(raw, str):
                items = [x.strip() for x in raw.split(",") if x.strip()]
            elif isinstance(raw, list):
                items = [str(x).strip() for x in raw]
            else:
                raise ValueError
            return items
        if spec.kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if spec.kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if spec.kind is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if not isinstance(raw, str):
            raise ValueError
        return raw
    except ValueError:
        kind = {list: "a list", bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
        raise ConfigError(f"invalid setting {where}: expected {kind[spec.kind]}") from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a flat TOML settings file; unknown keys are errors (typos should not pass)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
    if "openai_api_key" in data:
        raise ConfigError(f"config file {path}: openai_api_key is read from {API_KEY_ENV} only, never from a file")
    unknown = sorted(k for k in data if k not in SPECS_BY_NAME)
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return data


def load_settings(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_path: str | Path | None = None,
    warn: Callable[[str, str], None] | None = None,
) -> Settings:
    """Merge defaults < file < environment < flags, validate, and return Settings.

    `flags` holds only the flags the user gave (None values are ignored). `warn(event,
    name)` is called for each unknown SPEECHCAST_* variable. Raises ConfigError.
    """
    environ = environ or {}
    values: dict[str, tuple[Any, str]] = {}
    if config_path is not None:
        for name, raw in read_toml(config_path).items():
            values[name] = (raw, f"from {config_path}")
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name in SPECS_BY_NAME:
            values[name] = (raw, f"from {key}")
        elif warn is not None:
            warn("config.unknown_variable", key)
    for name, raw in (flags or {}).items():
        if raw is not None and name in SPECS_BY_NAME:
            values[name] = (raw, f"from --{name.replace('_', '-')}")

    settled: dict[str, Any] = {}
    for name, (raw, source) in values.items():
        spec = SPECS_BY_NAME[name]
        value = _convert(spec, raw, source)
        if (name in SECRET_NAMES or name == "broker") and not value:
            value = None  # `SPEECHCAST_CONTROL_TOKEN=` means "no token" (and an empty broker: none), as if unset
        elif spec.check is not None and (why := spec.check(value)):
            raise ConfigError(f"invalid setting {name} = {raw!r} ({source}): {why}")
        if name == "first_chunks_ms":
            value = [int(x) for x in value]
        settled[name] = tuple(value) if isinstance(value, list) else value
    settings = Settings(**settled, openai_api_key=environ.get(API_KEY_ENV) or None)
    _check_together(settings, {name: source for name, (_, source) in values.items()})
    return settings


def _check_together(settings: Settings, sources: Mapping[str, str]) -> None:
    """Checks that involve two settings (or a setting and the API key); raises ConfigError."""

    def fail(name: str, why: str) -> None:
        value = getattr(settings, name)
        value = list(value) if isinstance(value, tuple) else value
        raise ConfigError(f"invalid setting {name} = {value!r} ({sources.get(name, 'the default')}): {why}")

    if len(set(settings.fallback)) != len(settings.fallback):
        fail("fallback", "lists a provider more than once")
    if not settings.openai_api_key:
        if settings.provider == TTSProvider.OPENAI.value:
            fail("provider", f"openai needs the {API_KEY_ENV} environment variable, which is not set")
        if TTSProvider.OPENAI.value in settings.fallback:
            fail("fallback", f"openai needs the {API_KEY_ENV} environment variable, which is not set")
    if settings.port and settings.port == settings.http_port:
        fail("http_port", f"the WebSocket already uses port {settings.port}; pick another")


def _mask_url(url: str) -> str:
    """`url` with any password in it replaced by '***' (for printing)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def add_setting_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """Add `--some-name` for each setting (all of them unless `names` is given)."""
    for spec in SPECS:
        if names is not None and spec.name not in names:
            continue
        flag = "--" + spec.name.replace("_", "-")
        default = Settings.__dataclass_fields__[spec.name].default
        default_text = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f"{spec.help} (default: {default_text}; env {ENV_PREFIX}{spec.name.upper()})"
        if spec.kind is bool:
            parser.add_argument(flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=spec.name, default=None, metavar=spec.name.upper(), help=help_text)
