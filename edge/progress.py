"""Progress of long work (preparing the packed expert store) on stderr, with no extra dependency:
a bar redrawn in place on a terminal, a line at the start and the end otherwise."""
from __future__ import annotations

import sys
import time
from typing import Callable

Progress = Callable[[int, int], None]          # (done, total)


def stderr_bar(label: str) -> Progress:
    """A progress callback that draws `label [####....] done/total` on stderr."""
    start = time.perf_counter()
    tty = sys.stderr.isatty()
    shown = {"last": -1.0}

    def update(done: int, total: int) -> None:
        now = time.perf_counter()
        if tty and (done == total or now - shown["last"] > 0.1):
            fill = int(30 * done / max(1, total))
            sys.stderr.write(f"\r{label} [{'#' * fill}{'.' * (30 - fill)}] {done}/{total} {now - start:.1f} s")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()
            shown["last"] = now
        elif not tty and (done == 0 or done == total):
            print(f"{label}: {done}/{total}" + (f" in {now - start:.1f} s" if done else ""), file=sys.stderr)
    return update


def quiet(done: int, total: int) -> None:
    """A progress callback that shows nothing."""
