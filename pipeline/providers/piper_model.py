"""The embedded voice's model with its phoneme durations exposed as an output (what
`PiperVoice.load(..., include_alignments=True)` does in memory), made once and kept in a
cache file, so that the worker processes load it like the shipped model.

Why a file made by a short-lived process, not the patch in each worker: patching needs the
`onnx` package, and a worker that imports it and patches in memory keeps ~100 MB more
(measured VmPeak/RSS of a worker: 346/138 MB plain, 480/240 MB patched in memory), which
counts against `piper_worker_memory_mb`. The patched file gives the same session as the
in-memory patch, and the plain worker's footprint.

Standard library only: imported by the worker processes (piper_worker.start).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Patching takes ~1 s (onnx load, patch, save of a 63 MB model); this bounds a stuck one.
PATCH_TIMEOUT_S = 120
_PATCH = """
import sys
import onnx
from piper.patch_voice_with_alignment import add_alignment_output
model = onnx.load(sys.argv[1])
try:
    add_alignment_output(model)
except ValueError:
    sys.exit(3)  # already patched, or another graph: use the model as it is
onnx.save(model, sys.argv[2])
"""


def aligned_model(path: str) -> str:
    """The path of the model with alignments: a cached copy, made now if missing; `path`
    itself when it cannot be made (no `onnx`, the cache not writable): the voice then gives
    no alignments and the daemon estimates timings.

    Error handling: never raises for a failed patch; the cache directory must belong to
    this user and be private (a directory someone else made is not used).
    """
    source = Path(path)
    try:
        stat = source.stat()
        key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        folder = Path(tempfile.gettempdir()) / f"speechcast-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            return path
        cached = folder / f"{source.stem}-aligned-{key}.onnx"
        if cached.exists():
            return str(cached)
        partial = folder / f"{cached.name}.{os.getpid()}.part"
        done = subprocess.run(
            [sys.executable, "-c", _PATCH, str(source), str(partial)], capture_output=True, timeout=PATCH_TIMEOUT_S
        )
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            return path
        os.replace(partial, cached)  # atomic: a worker starting at the same time sees all or nothing
        return str(cached)
    except (OSError, subprocess.SubprocessError):
        return path
