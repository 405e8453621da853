"""Coverage-guided fuzzing (atheris, libFuzzer) of the parsers a client reaches first:
`client_input.parse_client_message` (WebSocket text), intake's `parse_options` (the
handshake path and query) and `client_input.parse_speak_body` (the `/v1/speak` body).

The property: each returns a value or raises its documented error (CommandError,
HandshakeError), never anything else. Run by `make fuzz`, or by hand:

    PYTHONPATH=. .venv/bin/python fuzz/atheris_protocol.py -max_total_time=60

libFuzzer writes a crashing input to ./crash-*; replay it by passing its path.
"""

from __future__ import annotations

import sys

import atheris

from actors.intake import parse_options
from pipeline import client_input, protocol
from pipeline.access import HandshakeError
from pipeline.errors import CommandError

# Coverage feedback from the parsers' own bytecode (and the stdlib's pure-Python parts
# they call, like urllib.parse): instrumenting everything loaded would slow each run.
for module in (protocol, sys.modules["actors.intake"], sys.modules["urllib.parse"]):
    for value in list(vars(module).values()):
        if callable(value) and getattr(value, "__module__", None) == module.__name__ and hasattr(value, "__code__"):
            setattr(module, value.__name__, atheris.instrument_func(value))


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    target = fdp.ConsumeIntInRange(0, 2)
    if target == 0:
        # ConsumeUnicode may produce lone surrogates: the parser must cope with any str.
        raw = fdp.ConsumeUnicode(fdp.remaining_bytes())
        try:
            client_input.parse_client_message(raw)
        except CommandError:
            pass
    elif target == 1:
        path = "/?" + fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
        try:
            parse_options(path)
        except HandshakeError:
            pass
    else:
        try:
            client_input.parse_speak_body(fdp.ConsumeBytes(fdp.remaining_bytes()))
        except CommandError:
            pass


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
