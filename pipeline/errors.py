"""The one exception tree of speechcast; each error knows its protocol error code.

    SpeechError                      code
    ├── CommandError                 invalid_json · invalid_command · empty_text ·
    │                                text_too_long · unknown_provider · binary_not_accepted
    ├── SessionError                 not_initialized · queue_full · unauthorized · rate_limited
    └── ProviderError                provider_failed (the base of every provider trouble)
        ├── ProviderUnavailable      provider_unavailable: not configured, not reachable,
        │                            circuit open; nothing was synthesized
        └── ProviderFailed           provider_failed: the request was made and went wrong
            ├── ProviderHTTPError    a 4xx/5xx answer (`status`, `retryable`, `retry_after`)
            ├── ProviderTimeout      connect, first byte, stall or piece deadline
            ├── ProviderEmptyAudio   a successful answer that carried no audio
            └── UnspeakableText      the TEXT made the provider fail (its phonemizer
                │                    crashed or ran out of memory, or the server refused
                │                    the input): `provider_fault` is False, so the
                │                    circuit breaker does not count it
                └── InputRefused     an HTTP 400/413/422: both a ProviderHTTPError
                                     (`status`) and an UnspeakableText

Messages are written for the person reading the event: what went wrong and what to do.
They never contain secrets (API keys are never formatted into them).
"""

from __future__ import annotations

from pipeline.events import ErrorCode


class SpeechError(Exception):
    """Base of every error speechcast reports to a client."""

    code = ErrorCode.PROVIDER_FAILED

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class CommandError(SpeechError):
    """A client message that cannot be turned into a command."""

    code = ErrorCode.INVALID_COMMAND


class SessionError(SpeechError):
    """A valid command the session cannot take now."""

    code = ErrorCode.NOT_INITIALIZED


class ProviderError(SpeechError):
    """Any trouble with a TTS provider."""

    code = ErrorCode.PROVIDER_FAILED
    retryable = False
    retry_after: float | None = None
    # False when the text, not the provider, caused the failure: a circuit breaker must
    # not open for everyone because one client sent something a voice cannot speak.
    provider_fault = True


class ProviderUnavailable(ProviderError):
    """The provider cannot be used at all (not configured, unreachable, circuit open)."""

    code = ErrorCode.PROVIDER_UNAVAILABLE
    retryable = True


class ProviderFailed(ProviderError):
    """A request to the provider was made and went wrong."""

    code = ErrorCode.PROVIDER_FAILED
    retryable = True


class ProviderHTTPError(ProviderFailed):
    """The provider answered with an HTTP error status."""

    def __init__(self, message: str, *, status: int, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        # 4xx means the request itself is wrong; repeating it cannot help, except
        # 408 (request timeout) and 429 (rate limited), which are about timing.
        self.retryable = status >= 500 or status in (408, 429)


class ProviderTimeout(ProviderFailed):
    """Connecting, waiting for the first byte, or waiting between bytes took too long."""


class ProviderEmptyAudio(ProviderFailed):
    """The provider answered successfully but sent no audio (Kokoros' unknown voice)."""


class UnspeakableText(ProviderFailed):
    """The provider failed because of this text, not because it is unwell (a phonemizer
    crash or memory blow-up on it, a 400/413/422 about the input): the piece fails, the
    fallback may try it, and the circuit breaker does not count it."""

    retryable = False
    provider_fault = False


class InputRefused(ProviderHTTPError, UnspeakableText):
    """An HTTP provider refused this request's input (HTTP 400, 413 or 422): the server is
    well, the request was not; never retried, not counted by the circuit breaker."""

    retryable = False
    provider_fault = False

    def __init__(self, message: str, *, status: int, retry_after: float | None = None) -> None:
        super().__init__(message, status=status, retry_after=retry_after)
        self.retryable = False
