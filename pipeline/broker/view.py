"""What every daemon learns from the speaker's output, so that whichever daemon becomes
the next speaker can continue where the last one stopped: the utterances accepted and not
yet finished (to end them honestly), the last chunk id and utterance number (never to go
back), and the session as last published.

The broker's state hash holds the same counters and the session; this local view is what
a daemon still knows when the broker itself was restarted empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.broker.items import HttpAnswer, Queued, utterance_number
from pipeline.events import Accepted, UtteranceFinished
from pipeline.flow import (
    Broadcast,
    FinishNotice,
    Frame,
    Reply,
    SessionStatus,
    StartNotice,
)

@dataclass
class OpenUtterance:
    """An utterance accepted by a speaker and not finished yet, as far as it was heard."""

    utterance_id: str
    owner: int | None
    provider: str | None = None  # the one heard first (None: no audio yet)
    chunks: int = 0
    last_chunk_id: int | None = None
    audio_bytes: int = 0
    text: Queued | None = None  # a whole text, to be spoken by the next speaker if none of it was heard


@dataclass
class ClusterView:
    """Folded from every item of the output stream, in order (`see`)."""

    open: dict[str, OpenUtterance] = field(default_factory=dict)
    last_chunk_id: int | None = None
    last_utterance: int = 0
    status: SessionStatus | None = None

    def see(self, item: object) -> None:
        match item:
            case Reply(to=to, event=Accepted(utterance_id=utt_id)):
                self._accepted(utt_id, to)
            case HttpAnswer(event=Accepted(utterance_id=utt_id)):
                self._accepted(utt_id, None)
            case Queued(utterance_id=utt_id, owner=owner):
                self._accepted(utt_id, owner).text = item
            case StartNotice(event=started):
                if (utt := self.open.get(started.utterance_id)) is not None:
                    utt.provider = started.provider
            case Frame(utterance_id=utt_id, chunk_id=chunk_id, pcm=pcm):
                self.last_chunk_id = chunk_id
                if (utt := self.open.get(utt_id)) is not None:
                    utt.chunks += 1
                    utt.last_chunk_id = chunk_id
                    utt.audio_bytes += len(pcm)
            case FinishNotice(event=UtteranceFinished(utterance_id=utt_id)) | Broadcast(
                event=UtteranceFinished(utterance_id=utt_id)
            ):
                self.open.pop(utt_id, None)
            case SessionStatus():
                self.status = item

    def _accepted(self, utt_id: str, owner: int | None) -> OpenUtterance:
        utt = self.open.get(utt_id)
        if utt is None:
            utt = self.open[utt_id] = OpenUtterance(utt_id, owner)
        if (number := utterance_number(utt_id)) is not None:
            self.last_utterance = max(self.last_utterance, number)
        return utt
