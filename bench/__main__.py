"""Run the benchmarks: `python -m bench` runs every module in BENCHES in order,
`python -m bench NAME [NAME ...]` only those. Each module has a `main()` that prints its
own table; options of one module: `python -m bench.NAME --help`."""

from __future__ import annotations

import importlib
import sys

# One entry per module of this package that has a `main()`; add new benchmarks here.
BENCHES = ["ttfa", "throughput", "fanout", "stream", "opus", "timing", "scaleout"]


def main(argv: list[str]) -> int:
    unknown = [name for name in argv if name not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    for name in argv or BENCHES:
        print(f"== bench.{name}", flush=True)
        importlib.import_module(f"bench.{name}").main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
