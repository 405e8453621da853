"""The router's FIFO: accepted utterances, and the marks a Close and a shutdown leave in
it, waiting for the speaker in the order they came."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import trio

from pipeline.flow import Envelope, Shutdown
from pipeline.speaking import Utterance


@dataclass(frozen=True)
class CloseMark:
    """Queued by Close: when the speaker reaches it, everything before it has been spoken."""

    asker: Envelope


class UtteranceQueue:
    """The FIFO of accepted utterances (and close and shutdown marks) waiting for the speaker."""

    def __init__(self) -> None:
        self._items: deque[Utterance | CloseMark | Shutdown] = deque()
        self._arrived = trio.Event()

    def __len__(self) -> int:
        return sum(isinstance(i, Utterance) for i in self._items)

    def put(self, item: Utterance | CloseMark | Shutdown) -> None:
        self._items.append(item)
        self._arrived.set()

    async def get(self) -> Utterance | CloseMark | Shutdown:
        while not self._items:
            self._arrived = trio.Event()
            await self._arrived.wait()
        return self._items.popleft()

    def drop_utterances(self) -> list[Utterance]:
        """Remove every waiting utterance (marks stay) and return them."""
        dropped = [i for i in self._items if isinstance(i, Utterance)]
        self._items = deque(i for i in self._items if not isinstance(i, Utterance))
        return dropped

    def drop_close_marks(self) -> list[CloseMark]:
        """Remove every waiting close mark (an Initialize cancelled them) and return them."""
        dropped = [i for i in self._items if isinstance(i, CloseMark)]
        self._items = deque(i for i in self._items if not isinstance(i, CloseMark))
        return dropped
