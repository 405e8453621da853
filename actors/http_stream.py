"""`POST /v1/speak` with `Content-Type: text/plain`: the request body is a streamed text
(DESIGN.md section 10), spoken while it is still arriving, e.g.

    some-llm | curl -T - -H 'Content-Type: text/plain' http://127.0.0.1:8766/v1/speak

The HTTP face calls `speak_streamed_body` after its own checks (origin, token, rate).
Each request is one streaming utterance: `text_start` when the request begins (`voice`,
`speed`, `provider` from the query string), a `text_append` per piece of body as it
arrives, `text_end` at its end; the answer (202 with the utterance id) comes when the
body has ended, by which time the speech has long started. A client that leaves mid-body
ends its stream like a WebSocket that closes (status `partial` if text was held).
"""

from __future__ import annotations

import codecs
import itertools
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import trio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

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
    """Speak the body as it arrives; 202 `{"utterance_id", "position", "streaming"}`.

    Error handling: a refused start gets its error event and status at once; a part that
    breaks the rules (not UTF-8: `invalid_json`; a control character: `invalid_command`;
    past max_stream_chars: `text_too_long`) ends the stream (what came before it is
    spoken) and is answered with that error.
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
    utterance_id = accepted.utterance_id
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        async for data in request.stream():
            await _append(command, utterance_id, decoder.decode(data))
            if (refused := _refusal(answers)) is not None:
                await command(TextEnd(utterance_id))
                return _error(refused, status_by_code)
        await _append(command, utterance_id, decoder.decode(b"", final=True))
    except ClientDisconnect:
        await command(Disconnected())
        return Response(status_code=400)  # nobody is there to read it
    except UnicodeDecodeError:
        await command(TextEnd(utterance_id))
        return _error(ErrorEvent(ErrorCode.INVALID_JSON, "the body is not UTF-8 text"), status_by_code)
    except CommandError as e:
        await command(TextEnd(utterance_id))
        return _error(ErrorEvent(e.code, e.message), status_by_code)
    await command(TextEnd(utterance_id))
    return JSONResponse({"utterance_id": utterance_id, "position": accepted.position, "streaming": True}, 202)


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

