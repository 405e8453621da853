"""Scale-out through Redis (DESIGN.md section 13, docs/scale-out.md): several daemons, one
audience. Imported only when the `broker` setting is given, so a daemon alone never loads
the Redis client.

    wire.py      the one codec for every item that crosses the broker
    items.py     the items only the bridge sends (commands with their sender, HTTP answers)
    link.py      the Redis client in trio (blocking calls in worker threads) and the keys
    view.py      what every daemon learns from the speaker's output (for a takeover)
    lease.py     the speaker lease: take it, renew it, lose it
    edge.py      every daemon's side: commands to the broker, the speaker's output to the broadcaster
    speaker.py   the speaker's side: router + chunker fed from the broker, output published
    scale_out.py the daemon's entry point tying them together
"""
