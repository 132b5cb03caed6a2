#!/usr/bin/env python3
"""Speculative decoding against plain decoding, side by side in one process, greedy.

For each prompt (repeat-this-JSON, edit-this-code, and held-out prose and code for a draft model),
each mode (plain; prompt lookup; a draft model when --draft is given) decodes in interleaved
rounds; reported: median decode tok/s, its ratio to plain, tokens per target forward, the share
of guesses kept, and whether the text equals plain greedy (else where it first differs: a
drafted block is rounded as a prompt piece, so near-ties can flip).

    python tests/bench/speculative.py TARGET [--draft DRAFT] [--memory-budget 370MB] [--rounds 3] [--json]

--memory-budget is each model's own memory (edge.load's meaning); a draft model holds its own on top.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

JOINTS = json.dumps([{"id": i, "name": f"joint_{i}", "angle": i * 7 % 90, "limits": [-90, 90]} for i in range(10)])
CODE = '''def move_to(robot, x, y, speed=0.5):
    """Move the robot's base to (x, y) at a fraction of its top speed."""
    if not robot.is_ready():
        raise RuntimeError("robot not ready")
    path = robot.planner.plan(robot.position, (x, y))
    for waypoint in path:
        robot.base.drive_to(waypoint, speed=speed)
        robot.log.info("reached %s", waypoint)
    return robot.position
'''


def prompts() -> dict[str, list[dict]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from heldout import heldout_text
    text = heldout_text(60_000)
    prose = text[4000:4600]
    at = text.index("def ", 70_000)
    code = text[at:at + 600]
    return {
        "repeat JSON": [{"role": "user", "content": "Repeat this JSON exactly:\n" + JOINTS}],
        "edit code": [{"role": "user", "content": "Rename the function move_to to drive_base and return the "
                                                  "whole code:\n" + CODE}],
        "prose": [{"role": "user", "content": "Continue this text:\n" + prose}],
        "code": [{"role": "user", "content": "Continue this Python code:\n" + code}],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target")
    ap.add_argument("--draft")
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--lookup-tokens", type=int, default=8)
    ap.add_argument("--memory-budget")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--write-prompts", help="Write the rendered prompts (JSON) for speculative_llama.py and stop.")
    a = ap.parse_args()
    import edge
    if a.write_prompts:
        m = edge.load(a.target, threads=1, context_length=2048, progress=False)
        Path(a.write_prompts).write_text(json.dumps({k: m.text.render_chat(v) for k, v in prompts().items()}))
        return
    common = dict(threads=a.threads, context_length=2048, progress=False)
    budget = a.memory_budget                      # the model's own memory, as edge.load takes it (each model alike)
    plain = edge.load(a.target, memory_budget=budget, **common)
    modes = {"plain": plain}
    lookup = edge.load(a.target, memory_budget=budget, prompt_lookup=3, draft_tokens=a.lookup_tokens, **common)
    modes["prompt lookup"] = lookup
    if a.draft:
        modes["draft"] = edge.load(a.target, memory_budget=budget, draft=a.draft, draft_tokens=a.draft_tokens, **common)
    rows = []
    for name, msgs in prompts().items():
        ids = plain.prepare_chat(msgs).ids
        speeds = {m: [] for m in modes}
        texts, stats = {}, {}
        for _ in range(a.rounds):
            for mode, model in modes.items():
                model.decoder.reset()
                texts[mode] = model.generate_ids(ids, max_new_tokens=a.tokens, temperature=0.0)
                s = stats[mode] = model.last_stats
                speeds[mode].append(s.decode_tok_s)
        base = statistics.median(speeds["plain"])
        for mode in modes:
            s, t = stats[mode], texts[mode]
            diff = next((i for i, (x, y) in enumerate(zip(t, texts["plain"])) if x != y), None)
            if diff is None and len(t) != len(texts["plain"]):
                diff = min(len(t), len(texts["plain"]))
            rows.append(dict(prompt=name, mode=mode, tok_s=statistics.median(speeds[mode]),
                             ratio=statistics.median(speeds[mode]) / base, tokens=len(t),
                             tokens_per_forward=s.tokens_per_forward, kept=s.accepted / s.drafted if s.drafted else 0.0,
                             equal_to_plain=diff is None, first_difference=diff))
    if a.json:
        print(json.dumps(rows))
        return
    print(f"{'prompt':<12} {'mode':<14} {'tok/s':>7} {'ratio':>6} {'tokens':>6} {'tok/fwd':>7} {'kept':>5}  equal")
    for r in rows:
        print(f"{r['prompt']:<12} {r['mode']:<14} {r['tok_s']:>7.1f} {r['ratio']:>6.2f} {r['tokens']:>6} "
              f"{r['tokens_per_forward']:>7.2f} {r['kept']:>5.0%}  "
              + ("yes" if r["equal_to_plain"] else f"no (from token {r['first_difference']})"))


if __name__ == "__main__":
    main()
