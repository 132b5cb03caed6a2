"""A calibration text for `edge export --calib`, disjoint from the held-out evaluation text.

Built deterministically like tests/bench/heldout.py, from what it leaves out: the Python reference
documentation's English after the first 300k characters (heldout.py uses those), and stdlib modules
heldout.py does not use. Prints its sha256 so results can be matched.

    python tests/bench/calibtext.py OUT.txt
"""
from __future__ import annotations

import inspect
import sys

from heldout import CODE_MODULES, fingerprint, heldout_text

MODULES = ["json", "argparse", "dataclasses", "functools", "pathlib"]


def calib_text(prose_chars: int = 60_000) -> str:
    """The documentation repeats paragraphs across topics: any the held-out text has are dropped."""
    from pydoc_data.topics import topics
    prose = "\n\n".join(topics[k].strip() for k in sorted(topics))[300_000:300_000 + prose_chars]
    held = set(heldout_text().split("\n\n"))
    prose = "\n\n".join(p for p in prose.split("\n\n") if p not in held)
    assert not set(MODULES) & set(CODE_MODULES)
    return prose + "\n\n" + "\n\n".join(inspect.getsource(__import__(m)) for m in MODULES)


if __name__ == "__main__":
    t = calib_text()
    held = set(p for p in heldout_text().split("\n\n") if len(p) > 200)
    shared = [p for p in t.split("\n\n") if p in held]
    assert not shared, f"{len(shared)} long paragraphs also in the held-out text"
    open(sys.argv[1], "w").write(t)
    print(f"{len(t)} characters, sha256 {fingerprint(t)}")
