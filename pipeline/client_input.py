"""What clients send, read defensively: a WebSocket text frame or a `/v1/speak` body
becomes a typed command, or a `CommandError` with its protocol code, never anything else
(DESIGN.md section 4, "Validation"; the accepted-input rules are in the README).

Intake and the HTTP face use `parse_client_message` and `parse_speak_body`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any, Final, TypeVar

from pipeline.commands import (
    Cancel,
    Close,
    Command,
    Initialize,
    SendMessage,
    SetTTSProvider,
    TextAppend,
    TextEnd,
    TextStart,
    TTSProvider,
)
from pipeline.errors import CommandError
from pipeline.events import ErrorCode
from pipeline.protocol import PROVIDER_NAMES

T = TypeVar("T")
MAX_TEXT_CHARS: Final = 4096
MIN_SPEED: Final = 0.25
MAX_SPEED: Final = 4.0


# Characters no voice can speak and no log or event should carry: C0 and C1 controls
# (tab, LF and CR are ordinary whitespace and pass) and lone UTF-16 surrogates, which a
# JSON "\\ud800" escape puts into a Python str although they are not characters.
_FORBIDDEN_IN_TEXT: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
# Something a voice can say: a letter or a digit in any script (`\\w` minus "_").
_SPEAKABLE: Final = re.compile(r"[^\W_]")
MAX_VOICE_CHARS: Final = 64
# What real servers name their voices: Kokoro's `af_heart`, its mixes `af_bella+af_sky`
# and `af_bella(2)+af_sky(1)`, Piper's `en_US-joe-medium`, OpenAI's `alloy`, ids with a
# colon or a dot. ASCII only; no slash, backslash, space or control character, and no
# leading dot, so a name can never be a path.
_VOICE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+(),:-]*", re.ASCII)


def parse_client_message(raw: str) -> Command:
    """Validate one client text frame and return its command.

    Error handling: raises CommandError with the protocol code (invalid_json,
    invalid_command, empty_text, text_too_long, unknown_provider), and nothing else:
    whatever a client sends, the caller gets an error to answer with.
    """
    return _guarded(lambda: _command(_load(raw)))


def parse_speak_body(body: bytes) -> SendMessage:
    """Validate a `POST /v1/speak` body (`{"text", "voice"?, "provider"?, "speed"?}`)
    with the rules of `send_message`, so both faces accept exactly the same input.

    Error handling: as `parse_client_message`; a body that is not UTF-8 is invalid_json.
    """

    def parse() -> SendMessage:
        try:
            raw = body.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandError("the body is not UTF-8 encoded JSON", code=ErrorCode.INVALID_JSON) from None
        message = _load(raw)
        if not isinstance(message, dict):
            raise CommandError("the body is a JSON object with a \"text\"", code=ErrorCode.INVALID_COMMAND)
        command = _command({**message, "type": "send_message"})
        assert isinstance(command, SendMessage)
        return command

    return _guarded(parse)


def _guarded(parse: Callable[[], T]) -> T:
    """Run a parser of client input; any exception it lets out becomes invalid_command.

    Client input must never take the daemon down: the parsers below raise CommandError
    for every case they know, and this catches a case they do not (a bug), so it costs
    one error event instead of the process.
    """
    try:
        return parse()
    except CommandError:
        raise
    except Exception as e:
        raise CommandError(f"the message could not be read ({type(e).__name__})", code=ErrorCode.INVALID_COMMAND) from None


def _refuse_constant(name: str) -> Any:
    # json accepts NaN and Infinity, which are not JSON.
    raise ValueError(f"{name} is not JSON")


def _load(raw: str) -> Any:
    """Decode JSON text.

    Error handling: invalid_json for bad syntax, NaN/Infinity, nesting too deep for the
    decoder and a number too long for Python's int conversion (over 4300 digits: json
    raises a plain ValueError for it, which once took the daemon down).
    """
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except json.JSONDecodeError:
        raise CommandError("the message is not valid JSON", code=ErrorCode.INVALID_JSON) from None
    except RecursionError:
        raise CommandError("the message is nested too deeply", code=ErrorCode.INVALID_JSON) from None
    except ValueError:
        raise CommandError(
            "the message holds a number that is not valid here (too long, NaN or Infinity)", code=ErrorCode.INVALID_JSON
        ) from None


def _command(message: Any) -> Command:
    if not isinstance(message, dict):
        raise CommandError("a command is a JSON object with a \"type\"", code=ErrorCode.INVALID_COMMAND)
    kind = message.get("type")
    if kind in ("send_message", "tts"):
        if "text" not in message:
            raise CommandError("\"text\" is required", code=ErrorCode.INVALID_COMMAND)
        return SendMessage(
            text=speakable_text(message["text"]),
            voice=voice_name(message.get("voice")),
            speed=_speed(message),
            provider=_provider(message, required=False),
        )
    if kind == "initialize":
        return Initialize()
    if kind == "set_tts_provider":
        provider = _provider(message, required=True)
        assert provider is not None
        return SetTTSProvider(provider)
    if kind == "close":
        return Close()
    if kind == "cancel":
        return Cancel(all=bool(_optional(message, "all", bool)))
    if kind == "text_start":
        first = message.get("text")
        return TextStart(
            voice=voice_name(message.get("voice")),
            speed=_speed(message),
            provider=_provider(message, required=False),
            text="" if first is None else stream_text(first, required=False),
        )
    if kind == "text_append":
        if "text" not in message:
            raise CommandError("\"text\" is required", code=ErrorCode.INVALID_COMMAND)
        return TextAppend(
            _utterance_id(message),
            stream_text(message["text"], required=True),
            flush=bool(_optional(message, "flush", bool)),
        )
    if kind == "text_end":
        last = message.get("text")
        return TextEnd(_utterance_id(message), "" if last is None else stream_text(last, required=False))
    if kind is None:
        raise CommandError("the command has no \"type\"", code=ErrorCode.INVALID_COMMAND)
    raise CommandError(
        f"unknown command type {_shown(kind)}; use initialize, send_message, "
        "set_tts_provider, close, cancel, text_start, text_append or text_end",
        code=ErrorCode.INVALID_COMMAND,
    )


def _shown(value: Any) -> str:
    """A client value quoted for an error message: short, and with anything unprintable
    escaped (ascii() escapes controls and surrogates, so the event always encodes)."""
    return ascii(str(value)[:40])


def _optional(message: dict[str, Any], field: str, kind: type) -> Any:
    value = message.get(field)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise CommandError(f"\"{field}\" must be a {kind.__name__}", code=ErrorCode.INVALID_COMMAND)
    return value


def speakable_text(text: Any) -> str:
    """Check a text a client wants spoken (WebSocket and HTTP alike) and return it.

    The rules, in order: a string (invalid_command); no control character other than
    tab, LF and CR, and no lone surrogate (invalid_command: no voice can speak them);
    at least one letter or digit in any script (empty_text: only whitespace,
    punctuation, symbols, emoji or zero-width characters gives a voice nothing to say);
    at most MAX_TEXT_CHARS characters (text_too_long).
    """
    checked = _check_text(text)
    if _SPEAKABLE.search(checked) is None:
        raise CommandError("\"text\" has nothing to speak: no letter or digit", code=ErrorCode.EMPTY_TEXT)
    return checked


def stream_text(text: Any, *, required: bool) -> str:
    """Check a part of a streamed text (DESIGN.md section 10): a string of at most
    MAX_TEXT_CHARS characters with no control character or lone surrogate, as whole texts.
    A part may be only whitespace (appends carry their own spaces); only "" is
    `empty_text`, and only where a part is `required` (text_append)."""
    if required and text == "":
        raise CommandError("\"text\" is empty", code=ErrorCode.EMPTY_TEXT)
    return _check_text(text)


def _check_text(text: Any) -> str:
    """The rules every text or part of one follows: a string, at most MAX_TEXT_CHARS,
    no control character (but tab, LF, CR) and no lone surrogate; the text."""
    if not isinstance(text, str):
        raise CommandError("\"text\" must be a string", code=ErrorCode.INVALID_COMMAND)
    if len(text) > MAX_TEXT_CHARS:
        raise CommandError(
            f"\"text\" has {len(text)} characters; at most {MAX_TEXT_CHARS} are accepted",
            code=ErrorCode.TEXT_TOO_LONG,
        )
    if (bad := _FORBIDDEN_IN_TEXT.search(text)) is not None:
        raise CommandError(
            f"\"text\" holds {ascii(bad.group())} at position {bad.start()}: control characters "
            "(other than tab and line breaks) and lone surrogates cannot be spoken",
            code=ErrorCode.INVALID_COMMAND,
        )
    return text


def _utterance_id(message: dict[str, Any]) -> str:
    value = message.get("utterance_id")
    if not isinstance(value, str) or not value:
        raise CommandError("\"utterance_id\" is required: the id `accepted` gave for text_start", code=ErrorCode.INVALID_COMMAND)
    return value


def voice_name(voice: Any) -> str | None:
    """Check an optional voice name: None or "" mean the provider's default.

    Error handling: invalid_command unless it is a string of at most MAX_VOICE_CHARS
    ASCII letters, digits and `_ . + ( ) , : -`, starting with a letter or digit. Whether
    the provider knows the voice is the router's question, not the protocol's.
    """
    if voice is None or voice == "":
        return None
    if not isinstance(voice, str):
        raise CommandError("\"voice\" must be a string", code=ErrorCode.INVALID_COMMAND)
    if len(voice) > MAX_VOICE_CHARS or _VOICE.fullmatch(voice) is None:
        raise CommandError(
            f"\"voice\" must be at most {MAX_VOICE_CHARS} ASCII letters, digits and _ . + ( ) , : - "
            "starting with a letter or digit (like af_heart, af_bella+af_sky or en_US-joe-medium)",
            code=ErrorCode.INVALID_COMMAND,
        )
    return voice


def _speed(message: dict[str, Any]) -> float | None:
    speed = message.get("speed")
    if speed is None:
        return None
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not math.isfinite(speed):
        raise CommandError("\"speed\" must be a number", code=ErrorCode.INVALID_COMMAND)
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise CommandError(f"\"speed\" must be between {MIN_SPEED} and {MAX_SPEED}", code=ErrorCode.INVALID_COMMAND)
    return float(speed)


def _provider(message: dict[str, Any], *, required: bool) -> TTSProvider | None:
    name = message.get("provider")
    if name is None:
        if required:
            raise CommandError("\"provider\" is required", code=ErrorCode.INVALID_COMMAND)
        return None
    if not isinstance(name, str):
        raise CommandError("\"provider\" must be a string", code=ErrorCode.INVALID_COMMAND)
    try:
        return TTSProvider(name)
    except ValueError:
        raise CommandError(
            f"unknown provider {_shown(name)}; use {', '.join(PROVIDER_NAMES)}", code=ErrorCode.UNKNOWN_PROVIDER
        ) from None
