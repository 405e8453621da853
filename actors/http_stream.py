"""`POST /v1/speak` with `Content-Type: text/plain`: the request body is a streamed text
(DESIGN.md section 10), spoken while it is still arriving, e.g.

    some-llm | curl -N -X POST -T - -H 'Content-Type: text/plain' http://127.0.0.1:8766/v1/speak

The HTTP face calls `speak_streamed_body` after its own checks (origin, token, rate).
Each request is one streaming utterance: `text_start` when the request begins (`voice`,
`speed`, `provider` from the query string), a `text_append` per piece of body as it
arrives, `text_end` at its end. The answer is full duplex: 202 and the utterance id as
soon as the utterance is accepted, while the body is still arriving; the response ends
when the body does (with an error line if the stream was refused midway). A client that
leaves mid-body ends its stream like a WebSocket that closes (status `partial` if text
was held).
"""

from __future__ import annotations

import codecs
import itertools
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from pipeline import client_input, protocol
from pipeline.commands import Command, Disconnected, TextAppend, TextEnd, TextStart
from pipeline.errors import CommandError
from pipeline.events import Accepted, ErrorCode, ErrorEvent, ServerEvent
from pipeline.flow import Envelope

# Streams opened over HTTP are owned by ids counting down from -1: never a WebSocket's.
_OWNERS: Final = itertools.count(-1, -1)
Commander = Callable[[Command], Awaitable[None]]
# The router takes a command in microseconds, and answers a text_start at once.
ANSWER_TIMEOUT: Final = 30.0


async def speak_streamed_body(
    request: Request, commands: trio.MemorySendChannel[Envelope], status_by_code: Mapping[str, int]
) -> Response:
    """Start the streamed utterance; its response (`StreamedSpeech`) speaks the body.

    Error handling: a refused start (bad query, queue full, closed session...) is answered
    at once with its error event and status, and nothing is read or spoken.
    """
    owner = next(_OWNERS)
    answers_send, answers = trio.open_memory_channel[ServerEvent](64)

    async def command(cmd: Command) -> None:
        await commands.send(Envelope(owner, cmd, trio.current_time(), answer=answers_send))

    try:
        start = _text_start(request.query_params)
    except CommandError as e:
        return _error(ErrorEvent(e.code, e.message), status_by_code)
    await command(start)
    with trio.move_on_after(ANSWER_TIMEOUT):
        accepted = await answers.receive()
    if not isinstance(accepted, Accepted):
        return _error(accepted, status_by_code) if isinstance(accepted, ErrorEvent) else Response(status_code=504)
    return StreamedSpeech(accepted, command, answers)


class StreamedSpeech(Response):
    """The answer to a streamed `/v1/speak`, sent while the request body still arrives.

    202 with `Content-Type: application/x-ndjson` and the line
    `{"utterance_id", "position", "streaming": true}` as soon as the utterance is
    accepted; then the body is read and appended as it arrives, and the response ends
    when the body does. Error handling: a part that breaks the rules (not UTF-8:
    `invalid_json`; a control character: `invalid_command`; past max_stream_chars:
    `text_too_long`) ends the stream (what came before it is spoken), adds the error
    event as a last line and ends the response without reading the rest; a client that
    leaves mid-body ends its stream like a WebSocket that closes.
    """

    def __init__(self, accepted: Accepted, command: Commander, answers: trio.MemoryReceiveChannel[ServerEvent]) -> None:
        super().__init__(status_code=202, media_type="application/x-ndjson")
        # The length is unknown until the body ends: the response is chunked.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.accepted = accepted
        self.command = command
        self.answers = answers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        accepted = json.dumps(protocol.accepted_body(self.accepted), separators=(",", ":")).encode() + b"\n"
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": accepted, "more_body": True})
        refused = await self._speak_body(receive)
        last = b"" if refused is None else protocol.render(refused).encode() + b"\n"
        await send({"type": "http.response.body", "body": last, "more_body": False})

    async def _speak_body(self, receive: Receive) -> ErrorEvent | None:
        """Append the body as it arrives, then end the stream; the error that ended it
        early, if one did."""
        utterance_id = self.accepted.utterance_id
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    await self.command(Disconnected())
                    return None  # nobody is there to read an answer
                await _append(self.command, utterance_id, decoder.decode(message.get("body", b"")))
                if (refused := _refusal(self.answers)) is not None:
                    await self.command(TextEnd(utterance_id))
                    return refused
                if not message.get("more_body", False):
                    break
            await _append(self.command, utterance_id, decoder.decode(b"", final=True))
        except UnicodeDecodeError:
            refused = ErrorEvent(ErrorCode.INVALID_JSON, "the body is not UTF-8 text")
        except CommandError as e:
            refused = ErrorEvent(e.code, e.message)
        else:
            refused = None
        await self.command(TextEnd(utterance_id))
        return refused


def _text_start(query: Mapping[str, str]) -> TextStart:
    """The text_start of the query string's `voice`, `speed` and `provider`, checked by
    the WebSocket's own rules."""
    message: dict[str, object] = {"type": "text_start"}
    for name in ("voice", "provider"):
        if name in query:
            message[name] = query[name]
    if "speed" in query:
        try:
            message["speed"] = float(query["speed"])
        except ValueError:
            raise CommandError('"speed" must be a number', code=ErrorCode.INVALID_COMMAND) from None
    command = client_input.parse_client_message(json.dumps(message))
    assert isinstance(command, TextStart)
    return command


async def _append(command: Commander, utterance_id: str, text: str) -> None:
    for start in range(0, len(text), client_input.MAX_TEXT_CHARS):
        part = client_input.stream_text(text[start : start + client_input.MAX_TEXT_CHARS], required=False)
        if part:
            await command(TextAppend(utterance_id, part))


def _refusal(answers: trio.MemoryReceiveChannel[ServerEvent]) -> ErrorEvent | None:
    """An error the router answered an append with, if any (appends are answered only
    when refused)."""
    try:
        answer = answers.receive_nowait()
    except trio.WouldBlock:
        return None
    return answer if isinstance(answer, ErrorEvent) else None


def _error(event: ErrorEvent, status_by_code: Mapping[str, int]) -> Response:
    return JSONResponse(protocol.as_dict(event), status_by_code.get(event.code, 400))

