"""The session's states and transitions, as one table (docs/session.md draws the same).

The router alone owns the session: it applies `transition` to each Initialize, Close and
to each close mark the speaker reaches (`Drained`), and publishes the state it lands in.
Everyone else (hello, /v1/info, /readyz) repeats what it published.

    ┌──────── initialize ────────┐
    ▼                            │
  open ──close──► closing ──drained──► closed
    ▲               │                    │
    └─ initialize ──┘◄──── initialize ───┘

- open: messages are accepted. A failed provider check leaves the session open (each
  utterance then falls back or ends `failed`, honestly); /readyz reports the provider.
- closing: a Close is draining the queue; new messages get `not_initialized`. An
  Initialize here cancels the pending close: each waiting Close is answered `closed`
  at once, then the Initialize `ready`, and no `closed` follows.
- closed: the queue is done and the providers released; messages get `not_initialized`.
"""

from __future__ import annotations

import enum
from typing import Final


class SessionState(enum.StrEnum):
    """Where the session stands; the value is what `hello.session` and /v1/info say."""

    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class SessionInput(enum.StrEnum):
    """What moves the session: the two commands, and the speaker reaching a close mark."""

    INITIALIZE = "initialize"
    CLOSE = "close"
    DRAINED = "drained"


_O, _C, _X = SessionState.OPEN, SessionState.CLOSING, SessionState.CLOSED
_INIT, _CLOSE, _DRAINED = SessionInput.INITIALIZE, SessionInput.CLOSE, SessionInput.DRAINED

# (state, input) -> next state; every pair is listed, so no move is illegal.
TRANSITIONS: Final[dict[tuple[SessionState, SessionInput], SessionState]] = {
    (_O, _INIT): _O,
    (_O, _CLOSE): _C,
    (_O, _DRAINED): _O,  # cannot happen: an Initialize removes the close marks it cancels
    (_C, _INIT): _O,  # cancels the pending close
    (_C, _CLOSE): _C,
    (_C, _DRAINED): _X,
    (_X, _INIT): _O,
    (_X, _CLOSE): _C,  # answered `closed` as soon as the speaker reaches its mark
    (_X, _DRAINED): _X,
}

# The states in which send_message is accepted.
ACCEPTING: Final = frozenset({SessionState.OPEN})


def transition(state: SessionState, event: SessionInput) -> SessionState:
    """The state after `event` in `state` (a direct reading of TRANSITIONS)."""
    return TRANSITIONS[(state, event)]
