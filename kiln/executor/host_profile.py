"""Where the engine loop's host time goes: ``KILN_HOST_PROFILE=FILE`` runs the loop under cProfile.

A small model at batch 1 is host-bound on a GPU (a step's Python, launches and copies take as long as
its kernels), and which of them costs what can only be seen on the machine that runs the GPU. The
variable is read where the loop starts, in whichever process runs it (the engine's worker process
inherits it); the statistics are written to FILE when the loop ends (the engine's shutdown).
``kiln bench --host-profile FILE`` sets it; ``python -m kiln.executor.host_profile FILE`` prints them.
cProfile adds a few microseconds to every Python call, so read the split, not the absolute times.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
from collections.abc import Iterator
from contextlib import contextmanager

ENV = "KILN_HOST_PROFILE"


@contextmanager
def engine_loop_profile() -> Iterator[None]:
    """Profile the enclosed loop into the file ``KILN_HOST_PROFILE`` names (nothing when unset)."""
    path = os.environ.get(ENV)
    if not path:
        yield
        return
    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        # the loop's end is no time to fail on a missing folder
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        prof.dump_stats(path)


def report(path: str, top: int = 30) -> str:
    """The profile's functions by own time and by cumulative time, ``top`` of each."""
    out = io.StringIO()
    stats = pstats.Stats(path, stream=out).strip_dirs()
    for key in ("tottime", "cumulative"):
        out.write(f"== engine loop host time by {key}\n")
        stats.sort_stats(key).print_stats(top)
    return out.getvalue()


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m kiln.executor.host_profile FILE [TOP]")
    print(report(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else 30))
