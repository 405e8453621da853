"""The `speechcast` command: serve the daemon, say something, listen to the stream,
print the effective configuration.
"""

from __future__ import annotations

import argparse
import codecs
import gc
import json
import os
import signal
import sys
import urllib.parse
import wave
from collections.abc import Sequence

import structlog
import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from pipeline import __version__, client_input, protocol
from pipeline.audio import read_wav
from pipeline.commands import SendMessage, TextAppend, TextEnd, TextStart, TTSProvider
from pipeline.config import ConfigError, Settings, add_setting_flags, load_settings
from pipeline.events import Accepted, ErrorEvent, Status, UtteranceFinished, UtteranceStarted, Words
from pipeline.logs import configure_logging

DEFAULT_URL = "ws://127.0.0.1:8765"
STDIN_READ = 4096  # bytes read from standard input at a time by `say --stream`
EXIT_CONFIG = 2  # a setting is invalid: nothing was started
EXIT_FAILED = 1  # the daemon could not run (e.g. its port is taken)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Their default action would kill the daemon mid-utterance. SIGHUP (a closed terminal, or
# `systemctl reload`) will reload settings one day; for now it and the user signals are
# logged and otherwise ignored.
IGNORED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speechcast",
        description="A speech daemon: text in over WebSocket or HTTP, audio streamed to every subscriber.",
    )
    parser.add_argument("--version", action="version", version=f"speechcast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the daemon until SIGINT/SIGTERM",
        description="Run the daemon. Every setting can also come from SPEECHCAST_<NAME> or the --config file; "
        "flags beat environment beats file beats defaults. A bad setting exits with 2. SIGTERM or SIGINT stops "
        "gracefully (the speaking utterance gets shutdown_grace seconds, every WebSocket is closed with 1001); "
        "a second signal stops at once.",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML file with settings (flat keys, e.g. port = 8765)")
    add_setting_flags(serve)

    say = commands.add_parser(
        "say",
        help="speak one text and wait until it has been spoken",
        description="Send TEXT on a control-only connection, wait for its utterance_finished, print one "
        "summary line. Exits 1 if the daemon reports an error or the utterance was not spoken in full.",
    )
    say.add_argument("text", metavar="TEXT", nargs="?", help="the text (omit it with --stream)")
    say.add_argument(
        "--stream",
        action="store_true",
        help="read the text from standard input as it arrives and speak it while it is still being written, "
        "e.g. `some-llm | speechcast say --stream` (a streaming utterance: text_start/text_append/text_end)",
    )
    say.add_argument("--url", default=DEFAULT_URL, help=f"daemon WebSocket URL (default {DEFAULT_URL})")
    say.add_argument("--voice", help="voice name of the provider")
    say.add_argument("--speed", type=float, help="speaking speed, 0.25 to 4.0")
    say.add_argument("--provider", choices=protocol.PROVIDER_NAMES, help="one-off provider for this text")
    say.add_argument("--token", help="control token, when the daemon requires one")
    say.add_argument("--timeout", type=float, default=120.0, help="seconds to wait in all (default 120)")

    listen = commands.add_parser(
        "listen",
        help="subscribe and write the next utterances' audio to a WAV file",
        description="Subscribe to the daemon and write the audio of the next COUNT utterances to one WAV file.",
    )
    listen.add_argument(
        "--url",
        action="append",
        help=f"daemon WebSocket URL (default {DEFAULT_URL}); several (repeated or comma-separated): daemons "
        "serving one audience, tried in turn when a connection fails or drops (docs/scale-out.md)",
    )
    listen.add_argument("--out", required=True, metavar="FILE.wav", help="WAV file to write")
    listen.add_argument("--count", type=int, default=1, help="utterances to record (default 1)")
    listen.add_argument("--token", help="listen token, when the daemon requires one")
    listen.add_argument(
        "--format", choices=("wav", "opus"), default="wav", help="what to receive: WAV chunks, or Opus (decoded here)"
    )
    listen.add_argument("--words", action="store_true", help="print each word with its time as it arrives")

    config = commands.add_parser(
        "config",
        help="show the effective settings (secrets masked)",
        description="Print the settings `serve` would use with the same flags, environment and --config file, "
        "as one JSON object (secrets as \"***\"). Exits 2 on a bad setting, like serve.",
    )
    config.add_argument("--print", action="store_true", required=True, help="print the effective settings as JSON")
    config.add_argument("--config", metavar="FILE", help="TOML file with settings")
    add_setting_flags(config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "config"):
        return _serve_or_print(args)
    if args.command == "say":
        return trio.run(say, args)
    return trio.run(listen, args)


def _serve_or_print(args: argparse.Namespace) -> int:
    """`serve` and `config --print`: load and check the settings (exit 2 naming the bad
    one), then print them (secrets masked) or run the daemon until a signal."""
    unknown: list[str] = []
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "print")}
    try:
        settings = load_settings(flags, os.environ, args.config, warn=lambda _event, name: unknown.append(name))
    except ConfigError as e:
        print(f"speechcast: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "config":
        for name in unknown:
            print(f"speechcast: warning: unknown variable {name} ignored", file=sys.stderr)
        print(json.dumps(settings.masked(), indent=2))
        return 0
    configure_logging(settings.log_format)
    log = structlog.get_logger()
    for name in unknown:
        log.warning("config.unknown_variable", variable=name)
    if settings.is_public_without_tokens():
        log.warning("daemon.public_without_tokens", host=settings.host, hint="set control_token and listen_token")
    try:
        trio.run(_serve_until_signalled, settings)
    except (OSError, BaseExceptionGroup) as e:
        error = _first_os_error(e)
        if error is None:
            raise
        log.error("daemon.failed", error=str(error))
        print(f"speechcast: cannot serve: {error}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _first_os_error(error: BaseException) -> OSError | None:
    """The OSError (e.g. a port already in use) inside `error`'s exception groups, if any."""
    if isinstance(error, OSError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            if (found := _first_os_error(inner)) is not None:
                return found
    return None


async def _serve_until_signalled(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT. The first signal stops gracefully (DESIGN.md section 3:
    at most shutdown_grace for the speaking utterance, then every WebSocket gets 1001);
    a second one stops at once. Either way the process exits 0. SIGHUP, SIGUSR1 and
    SIGUSR2 are logged as `daemon.signal` and change nothing."""
    from pipeline.daemon import RunningDaemon, serve

    log = structlog.get_logger()
    requested = trio.Event()
    # Opened before the daemon starts, so a signal during start-up is not lost either.
    with trio.open_signal_receiver(*STOP_SIGNALS, *IGNORED_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum in IGNORED_SIGNALS:
                        log.info("daemon.signal", signal=name, action="ignored")
                    elif not requested.is_set():
                        log.info("daemon.signal", signal=name, action="stop gracefully")
                        requested.set()
                    else:
                        log.warning("daemon.signal", signal=name, action="stop now")
                        log.info("daemon.stopped", graceful=False)
                        nursery.cancel_scope.cancel()

            async def run_daemon(task_status: trio.TaskStatus[RunningDaemon] = trio.TASK_STATUS_IGNORED) -> None:
                await serve(settings, shutdown=requested.wait, task_status=task_status)
                nursery.cancel_scope.cancel()  # drained: stop watching for signals

            nursery.start_soon(watch_signals)
            await nursery.start(run_daemon)
            # What start-up built (the voice, the actors, the libraries) lives as long as
            # this process: keep it out of the cyclic collector, whose full passes would
            # otherwise pause fan-out to thousands of subscribers (docs/fanout.md).
            gc.collect()
            gc.freeze()


# ---------------------------------------------------------------- clients


def with_query(url: str, **params: str | None) -> str:
    """`url` with the given query parameters set (None values left out)."""
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query.update({k: v for k, v in params.items() if v is not None})
    return urllib.parse.urlunsplit(parts._replace(path=parts.path or "/", query=urllib.parse.urlencode(query)))


def _fail(message: str) -> int:
    print(f"speechcast: {message}", file=sys.stderr)
    return 1


async def say(args: argparse.Namespace) -> int:
    if (args.text is None) != args.stream:
        return _fail("give TEXT, or --stream to read it from standard input (not both)")
    provider = TTSProvider(args.provider) if args.provider is not None else None
    request: SendMessage | TextStart = (
        TextStart(voice=args.voice, speed=args.speed, provider=provider)
        if args.stream
        else SendMessage(args.text, voice=args.voice, speed=args.speed, provider=provider)
    )
    url = with_query(args.url, subscribe="0", token=args.token)
    try:
        with trio.fail_after(args.timeout):
            async with open_websocket_url(url) as ws:
                await ws.send_message(protocol.encode_command(request))
                if not args.stream:
                    return await _await_spoken(ws)
                async with trio.open_nursery() as nursery:
                    utterance_id = await _await_accepted(ws)
                    if utterance_id is None:
                        return 1
                    nursery.start_soon(_stream_stdin, ws, utterance_id)
                    status = await _await_spoken(ws, utterance_id)
                    nursery.cancel_scope.cancel()  # spoken (or failed): stop reading input
                    return status
    except trio.TooSlowError:
        return _fail(f"gave up after {args.timeout:g} s without utterance_finished")
    except (OSError, HandshakeError) as e:
        return _fail(f"cannot connect to {args.url} ({e}); is `speechcast serve` running?")
    except ConnectionClosed as e:
        return _fail(f"the daemon closed the connection ({e.reason})")


async def _await_accepted(ws: WebSocketConnection) -> str | None:
    """The id `accepted` gives a text_start; None (after printing it) on an error."""
    while True:
        message = await ws.get_message()
        if isinstance(message, bytes):
            continue
        match protocol.decode_event(message):
            case Accepted() as accepted:
                return accepted.utterance_id
            case ErrorEvent(code=code, message=text):
                print(f"error {code}: {text}", file=sys.stderr)
                return None


async def _stream_stdin(ws: WebSocketConnection, utterance_id: str) -> None:
    """Append standard input to the stream as it arrives (UTF-8, split anywhere), then end it."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
        while data := await stdin.receive_some(STDIN_READ):
            await _append(ws, utterance_id, decoder.decode(data))
    await _append(ws, utterance_id, decoder.decode(b"", final=True))
    await ws.send_message(protocol.encode_command(TextEnd(utterance_id)))


async def _append(ws: WebSocketConnection, utterance_id: str, text: str) -> None:
    for start in range(0, len(text), client_input.MAX_TEXT_CHARS):
        part = text[start : start + client_input.MAX_TEXT_CHARS]
        await ws.send_message(protocol.encode_command(TextAppend(utterance_id, part)))


async def _await_spoken(ws: WebSocketConnection, utterance_id: str | None = None) -> int:
    errors = 0
    while True:
        message = await ws.get_message()
        if isinstance(message, bytes):
            continue
        match protocol.decode_event(message):
            case ErrorEvent(code=code, message=text, utterance_id=about) if about in (None, utterance_id):
                print(f"error {code}: {text}", file=sys.stderr)
                if utterance_id is None:
                    return 1
                errors += 1
            case Accepted() as accepted:
                utterance_id = accepted.utterance_id
            case UtteranceFinished() as done if done.utterance_id == utterance_id:
                ttfa = done.ttfa_ms
                print(
                    f"{utterance_id} {done.status}: {done.chunks} chunks, {done.audio_ms / 1000:.2f} s of audio"
                    + (f", first audio after {ttfa:.0f} ms" if ttfa is not None else "")
                )
                return 0 if done.status == Status.OK and not errors else 1


async def listen(args: argparse.Namespace) -> int:
    if args.count < 1:
        return _fail("--count must be at least 1")
    urls = [u.strip() for given in (args.url or [DEFAULT_URL]) for u in given.split(",") if u.strip()]
    recording = _Recording(args.count)
    failed_in_a_row = 0
    turn = 0
    # Connect to each URL in turn: a daemon that drops (it died, or stopped) hands the
    # listener to the next one, which serves the same audience. Give up once every URL
    # has failed in a row.
    while not recording.complete:
        url = urls[turn % len(urls)]
        turn += 1
        try:
            await _record(url, args, recording)
            failed_in_a_row = 0
        except (OSError, HandshakeError) as e:
            failed_in_a_row += 1
            print(f"cannot connect to {url} ({e})", file=sys.stderr)
            if failed_in_a_row >= len(urls):
                return _fail(f"cannot connect to {', '.join(urls)}; is `speechcast serve` running?")
            continue
        except ConnectionClosed as e:
            if len(urls) == 1:
                return _fail(f"the daemon closed the connection ({e.reason})")
            print(f"{url} closed the connection ({e.reason}); trying the next daemon", file=sys.stderr)
            continue
        except ValueError as e:
            return _fail(str(e))
    rate = recording.rate or 24000
    with wave.open(args.out, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(bytes(recording.pcm))
    print(f"wrote {args.out}: {len(recording.pcm) / 2 / rate:.2f} s", file=sys.stderr)
    return 0


def _print_words(event: Words) -> None:
    """One line per word: its start and end (seconds from the utterance's first sample)."""
    mark = " ~" if event.estimated else ""
    for word in event.words:
        print(f"{word.start_ms / 1000:7.3f} {word.end_ms / 1000:7.3f}  {word.word}{mark}", flush=True)


class _Recording:
    """What `listen` has heard so far, across reconnections."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.pcm = bytearray()
        self.rate: int | None = None
        self.done = 0
        self.last_chunk_id: int | None = None
        # With --format opus: the utterance being heard and its packets, decoded at its end.
        self.started: UtteranceStarted | None = None
        self.payloads: list[bytes] = []

    @property
    def complete(self) -> bool:
        return self.done >= self.count


async def _record(url: str, args: argparse.Namespace, recording: _Recording) -> None:
    """Record from one daemon until the recording is complete (raises what the connection
    raises; ValueError if the sample rate changes)."""
    timing = "words" if args.words else None
    async with open_websocket_url(with_query(url, format=args.format, token=args.token, timing=timing)) as ws:
        print(f"listening on {url} for {recording.count - recording.done} utterance(s)…", file=sys.stderr)
        while not recording.complete:
            message = await ws.get_message()
            if isinstance(message, bytes):
                frame = protocol.decode_voice_frame(message)
                if frame.chunk_id == recording.last_chunk_id:
                    continue  # (never twice, whatever a reconnection replays)
                recording.last_chunk_id = frame.chunk_id
                if args.format == "opus":
                    recording.payloads.append(frame.audio)
                    continue
                chunk_rate, audio = read_wav(frame.audio)
                if recording.rate not in (None, chunk_rate):
                    raise ValueError(f"sample rate changed from {recording.rate} to {chunk_rate}")
                recording.rate = chunk_rate
                recording.pcm += audio
                continue
            event = protocol.decode_event(message)
            if isinstance(event, UtteranceStarted):
                if recording.started is None or recording.started.utterance_id != event.utterance_id:
                    recording.started, recording.payloads = event, []
            elif isinstance(event, Words):
                _print_words(event)
            elif isinstance(event, UtteranceFinished):
                started = recording.started
                if started is not None and started.codec == "opus" and started.utterance_id == event.utterance_id:
                    from pipeline.opus import decode_utterance  # PyAV takes ~0.3 s to import: only here

                    recording.rate = rate = started.sample_rate
                    pcm = decode_utterance(recording.payloads, started.pre_skip or 0, rate)
                    recording.pcm += pcm[: event.audio_ms * rate // 1000 * 2]
                    recording.started, recording.payloads = None, []
                recording.done += 1
                print(f"{event.utterance_id} {event.status}: {event.audio_ms / 1000:.2f} s", file=sys.stderr)

if __name__ == "__main__":
    sys.exit(main())
