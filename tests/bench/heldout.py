"""The held-out evaluation text: English prose and Python code that no test or calibration uses.

Built deterministically from files every CPython 3.11 install has: the English of the Python
reference documentation (pydoc_data.topics) interleaved with stdlib modules' source. Its sha256
is printed with every result so numbers from different machines can be matched.

    python tests/bench/heldout.py OUT.txt
"""
from __future__ import annotations

import hashlib
import inspect
import sys

CODE_MODULES = ["fractions", "heapq", "bisect", "textwrap", "statistics", "shlex", "difflib", "colorsys",
                "calendar", "graphlib", "string", "fnmatch", "netrc", "sched", "queue", "base64"]


def heldout_text(english_chars: int = 300_000) -> str:
    from pydoc_data.topics import topics
    prose = "\n\n".join(topics[k].strip() for k in sorted(topics))[:english_chars]
    code = [inspect.getsource(__import__(m)) for m in CODE_MODULES]
    paras = prose.split("\n\n")
    out, step = [], max(1, len(paras) // len(code))
    for i, src in enumerate(code):                 # alternate prose and code, as real usage mixes them
        out.append("\n\n".join(paras[i * step:(i + 1) * step]))
        out.append(src)
    out.append("\n\n".join(paras[len(code) * step:]))
    return "\n\n".join(out)


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


if __name__ == "__main__":
    t = heldout_text()
    open(sys.argv[1], "w").write(t)
    print(f"{len(t)} characters, sha256 {fingerprint(t)}")
