#!/usr/bin/env python3
"""`edge serve` measured: decode speed with a JSON schema enforced, the prompt cache across chat
turns, and a load of concurrent streaming clients.

    python tests/bench/serve_bench.py BUNDLE [--only schema,turns,load] [--clients 16] [--seconds 120] [--json]

schema  in one process, the same prompt decoded with and without a JSON schema (interleaved rounds,
        decode tok/s per step), as a ratio.
turns   against a real server: a ~1,000-token system prompt, the first turn's time to first token
        against the second's (the prompt cache), and the second turn's greedy reply against the same
        request run cold (after another conversation has replaced the cache).
load    N clients stream chat requests at once for S seconds (a quarter of them disconnect after a
        few tokens); failed requests other than 503, p50/p95 time to first token, tokens/s, the
        server's RSS after warm-up and at the end, and the longest time from a disconnect to the
        end of its generation (the server's /health).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time

SCHEMA = {"type": "object", "properties": {"tasks": {"type": "array", "maxItems": 40, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                     "minutes": {"type": "integer", "minimum": 1, "maximum": 120}},
    "required": ["name", "minutes"], "additionalProperties": False}}}, "required": ["tasks"],
    "additionalProperties": False}
ASK = [{"role": "user", "content": "List twenty household tasks for a robot, with the minutes each takes, as JSON."}]


def bench_schema(bundle: str, threads: int, rounds: int = 5, tokens: int = 160) -> dict:
    import edge
    m = edge.load(bundle, threads=threads, context_length=1024, progress=False)
    speeds = {"free": [], "schema": []}
    for _ in range(rounds):
        for kind in ("free", "schema"):
            m.decoder.reset()                                 # the same prefill work each time
            m.chat(ASK, max_new_tokens=tokens, temperature=0, json_schema=SCHEMA if kind == "schema" else None)
            speeds[kind].append((m.last_stats.decode_tok_s, m.last_stats.generated_tokens))
    free = statistics.median(s for s, _ in speeds["free"])
    constrained = statistics.median(s for s, _ in speeds["schema"])
    return dict(free_tok_s=free, schema_tok_s=constrained, ratio=constrained / free,
                tokens={k: [n for _, n in v] for k, v in speeds.items()})


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, bundle: str, threads: int, *args: str):
        self.port = _port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "edge", "serve", bundle, "--port", str(self.port),
                                      "--threads", str(threads), "--name", "m", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import httpx
        for _ in range(1200):
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("edge serve did not come up")

    def health(self) -> dict:
        import httpx
        return httpx.get(self.base + "/health", timeout=5).json()

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def _stream(client, messages, **kw) -> tuple[float, str, int]:
    """(seconds to the first content, the text, content chunks) of one streaming chat request."""
    t0 = time.perf_counter()
    first, pieces = None, []
    for ch in client.chat.completions.create(model="m", messages=messages, stream=True, **kw):
        if ch.choices and ch.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            pieces.append(ch.choices[0].delta.content)
    return first or time.perf_counter() - t0, "".join(pieces), len(pieces)


def bench_turns(bundle: str, threads: int) -> dict:
    import openai
    rules = " ".join(f"Rule {i}: keep the arm below {i % 7 + 1} metres when a person is within {i % 5 + 2} metres."
                     for i in range(48))
    system = {"role": "system", "content": "You control a warehouse robot. " + rules}
    s = Server(bundle, threads, "--context", "2048")
    try:
        c = openai.OpenAI(base_url=s.base + "/v1", api_key="x", max_retries=0)
        prompt_tokens = c.chat.completions.create(model="m", messages=[system, {"role": "user", "content": "hi"}],
                                                  max_tokens=1).usage.prompt_tokens
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "warm up"}], max_tokens=4)
        conv = [system, {"role": "user", "content": "What is rule 3?"}]
        first_ttft, reply, _ = _stream(c, conv, max_tokens=48, temperature=0)
        conv += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And rule 4?"}]
        second_ttft, warm, _ = _stream(c, conv, max_tokens=48, temperature=0)
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "something else"}], max_tokens=4)
        cold_ttft, cold, _ = _stream(c, conv, max_tokens=48, temperature=0)
    finally:
        s.close()
    return dict(system_prompt_tokens=prompt_tokens, first_turn_ttft_s=first_ttft, second_turn_ttft_s=second_ttft,
                second_turn_cold_ttft_s=cold_ttft, ratio=second_ttft / first_ttft, identical_to_cold=warm == cold)


def bench_load(bundle: str, threads: int, clients: int, seconds: float) -> dict:
    import openai
    s = Server(bundle, threads, "--context", "1024", "--queue", str(clients))
    topics = ["a robot that learns to paint", "the moon", "a lighthouse keeper", "rain in the city", "a lost key"]
    results = {"ok": 0, "busy": 0, "failed": [], "ttft": [], "tokens": 0, "left": 0}
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(i: int) -> None:
        rng = random.Random(i)
        c = openai.OpenAI(base_url=s.base + "/v1", api_key="x", max_retries=0, timeout=600)
        while time.perf_counter() < stop_at:
            msgs = [{"role": "user", "content": f"Tell me a short story about {rng.choice(topics)}."}]
            leave_after = rng.randint(2, 6) if rng.random() < 0.25 else None
            t0 = time.perf_counter()
            try:
                stream = c.chat.completions.create(model="m", messages=msgs, stream=True, max_tokens=rng.randint(16, 64),
                                                   temperature=0.7, seed=rng.randint(0, 1 << 30))
                n, first = 0, None
                for ch in stream:
                    if ch.choices and ch.choices[0].delta.content:
                        first = first or time.perf_counter() - t0
                        n += 1
                        if leave_after and n >= leave_after:
                            stream.close()
                            break
                with lock:
                    results["ok"] += 1
                    results["tokens"] += n
                    results["left"] += bool(leave_after)
                    if first is not None:
                        results["ttft"].append(first)
            except openai.APIStatusError as e:
                with lock:
                    if e.status_code == 503:
                        results["busy"] += 1
                    else:
                        results["failed"].append(f"{e.status_code}: {e.message}"[:200])
                time.sleep(1)
            except Exception as e:
                with lock:
                    results["failed"].append(f"{type(e).__name__}: {e}"[:200])
    try:
        threads_ = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        t0 = time.perf_counter()
        for t in threads_:
            t.start()
        time.sleep(min(20.0, seconds / 4))
        warm_rss = s.rss_mb()
        trend = [warm_rss]
        while any(t.is_alive() for t in threads_):
            time.sleep(1)
            if len(trend) < (time.perf_counter() - t0 - 20) // 10 + 1:
                trend.append(s.rss_mb())
        for t in threads_:
            t.join()
        wall = time.perf_counter() - t0
        time.sleep(0.5)
        end_rss, health = s.rss_mb(), s.health()
    finally:
        s.close()
    ttft = sorted(results["ttft"])
    pick = lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else float("nan")
    return dict(clients=clients, seconds=wall, requests_ok=results["ok"], busy_503=results["busy"],
                failed=results["failed"][:10], n_failed=len(results["failed"]), disconnects=results["left"],
                ttft_p50_s=pick(0.5), ttft_p95_s=pick(0.95), tokens_per_s=results["tokens"] / wall,
                rss_warm_mb=warm_rss, rss_end_mb=end_rss, rss_every_10s_mb=[round(r, 1) for r in trend], rss_growth=(end_rss - warm_rss) / warm_rss,
                server_cancelled=health["cancelled"], cancel_ms_max=health["cancel_ms_max"],
                pieces_after_disconnect_max=health["pieces_after_leaving_max"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--only", default="schema,turns,load")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    out = {}
    for part in a.only.split(","):
        if part == "schema":
            out["schema"] = bench_schema(a.bundle, a.threads)
        elif part == "turns":
            out["turns"] = bench_turns(a.bundle, a.threads)
        elif part == "load":
            out["load"] = bench_load(a.bundle, a.threads, a.clients, a.seconds)
        else:
            raise SystemExit(f"unknown part {part!r}")
        if not a.json:
            print(part, json.dumps(out[part], indent=1), flush=True)
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
