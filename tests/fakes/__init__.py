"""Test doubles that behave like the outside world speechcast talks to (see `tts_servers`)."""
