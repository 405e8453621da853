"""speechcast: a long-running speech daemon (text in over WebSocket/HTTP, audio out to subscribers)."""

__version__ = "0.1.0"
