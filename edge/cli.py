"""The `edge` command: export, run, chat, serve, bench, inspect (devices and plan: cli_devices.py)."""
from __future__ import annotations

import collections
import json
import os
import sys
import traceback
from typing import List, Optional

import typer

from .cli_devices import apply_device, devices_app, plan_command, print_table, run_emulated
from .cli_tasks import embed_command, require_task, transcribe_command
from .errors import EdgeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Run open-weight LLMs on constrained devices.")
_state = {"debug": False}


def _version(value: bool):
    if value:
        from importlib.metadata import version
        import onnxruntime
        print(f"edge {version('edge')} (onnxruntime {onnxruntime.__version__})")
        raise typer.Exit()


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    _state["debug"] = debug


def _sampling(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop) -> dict:
    return dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop) if stop else None)


_MAX = typer.Option(256, "--max-new-tokens", "-n", help="Tokens to generate at most.")
_TEMP = typer.Option(None, help="0 = greedy (default: the model's generation config).")
_TOPK = typer.Option(None, "--top-k")
_TOPP = typer.Option(None, "--top-p")
_MINP = typer.Option(None, "--min-p")
_REP = typer.Option(None, "--repetition-penalty")
_SEED = typer.Option(None, help="Seed for sampling.")
_STOP = typer.Option(None, "--stop", metavar="TEXT", help="Stop string (repeatable).")
_THREADS = typer.Option(None, help="CPU threads (default: all available cores).")
_CTX = typer.Option(None, "--context", help="Context window in tokens (default: min(model max, 4096)).")
_BUDGET = typer.Option(None, "--memory-budget", help="MoE models: most memory the whole process may use, e.g. 300MB.")
_POLICY = typer.Option("lfu", "--expert-policy", help="MoE models: expert cache policy, lfu or lru.")
_STORE = typer.Option(None, "--store", help="MoE models: folder of the packed expert store (default: BUNDLE/packed, "
                      "or ~/.cache/edge/packed/... when the bundle is read-only); see `edge prepare`.")
_SLOTS = typer.Option(True, "--expert-slots/--no-expert-slots", help="MoE models under a budget: expert slots (a "
                      "miss is one read; default) or a session built per miss (the slower path, for comparison).")
_DRAFT = typer.Option(None, "--draft", help="Speculative decoding: a smaller bundle with the same tokenizer "
                      "guesses tokens that the model checks several at a time.")
_DRAFT_TOKENS = typer.Option(4, "--draft-tokens", help="Speculative decoding: most tokens guessed at once.")
_LOOKUP = typer.Option(None, "--prompt-lookup", help="Speculative decoding from the text itself: guess what followed "
                       "the last N tokens earlier in the prompt or output (e.g. 3; good for JSON and code edits).")
_DEVICE = typer.Option(None, "--device", help="Plan threads, context and memory budget for a device profile "
                       "(see `edge devices list`), or 'host'.")
_EMULATE = typer.Option(None, "--emulate", help="Run inside cgroups shaped like this device (RAM, storage "
                        "speed, cores; needs root); implies --device.")


@app.command()
def export(src: str = typer.Argument(..., help="Hugging Face model folder, .gguf file, or hub id."),
           out: str = typer.Option(..., "-o", "--out", help="Bundle folder to write."),
           quant: Optional[str] = typer.Option(None, help="fp32 | int8 | int4 for the linear layers (default: int4, "
                                               "or chosen for --device)."),
           block_size: Optional[int] = typer.Option(None, help="Quantization block size: 16, 32, 64, 128, 256 "
                                                    "(default 16 for int8, 32 for int4, 64 for an int4 MoE's experts)."),
           device: Optional[str] = typer.Option(None, "--device", help="Choose quantization defaults for a device "
                                                "profile (see `edge devices list`)."),
           asymmetric: bool = typer.Option(False, "--asymmetric", help="Use zero points (asymmetric quantization)."),
           method: str = typer.Option("mse", help="mse (weighted per-block scale search: lower error, same size "
                                      "and speed, slower export) | gptq (needs --calib: each column's rounding "
                                      "error is compensated in the columns after it) | rtn (round to nearest)."),
           quant_policy: str = typer.Option("", "--quant-policy", help="Per kind of weight, e.g. "
                                            "'attention=int8,down=int8,experts=int4/64' (kinds: attention, attention_qkv, mlp, "
                                            "mlp_down, experts, experts_down, down, embed, lm_head)."),
           embed_quant: str = typer.Option("auto", help="fp32 | int8 | int4 | auto (fp32 for fp32 exports, else int8)."),
           lm_head_quant: str = typer.Option("auto", help="fp32 | int8 | int4 | auto (a tied head: as the "
                                                 "embedding, stored once; else as --quant)."),
           max_context: int = typer.Option(0, help="Cap the context the bundle supports (0: the model's)."),
           calib: str = typer.Option("", "--calib", help="A text file (not your evaluation text): run it through "
                                     "the fp32 model and weigh each weight's quantization by how large its input "
                                     "channel's activations are (llama.cpp's importance matrix idea); with --method gptq, "
                                     "the activations' X^T X drives GPTQ. Needs temporary disk for an fp32 copy of "
                                     "the model."),
           calib_tokens: int = typer.Option(16384, help="Tokens of --calib to run."),
           via: str = typer.Option("auto", "--via", help="auto (edge's own graphs where it has the architecture, "
                                   "else optimum's) | edge | optimum."),
           task: str = typer.Option("", "--task", help="With optimum: text-generation | feature-extraction | "
                                    "automatic-speech-recognition (default: from the checkpoint)."),
           force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
           as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")):
    """Export a checkpoint to an edge bundle."""
    try:
        from export import ExportOptions, export_model
    except ImportError as e:
        raise EdgeError(f"the exporter needs extra packages ({e.name} is missing): pip install 'edge[export]'") from None
    if device and quant is None:
        from export.for_device import device_defaults
        from export.sources import open_source
        from .cli_devices import resolve_device
        quant, why = device_defaults(open_source(src).config, resolve_device(device))
        print(f"[{why}]", file=sys.stderr)
    quant, block_size = quant or "int4", block_size or 0
    if src.endswith(".gguf") and quant == "int4":
        from export.sources import open_source
        kinds = [t for t in open_source(src).types if t.startswith(("Q", "IQ"))]
        if kinds:
            print(f"note: this GGUF's weights are already quantized ({', '.join(kinds)}); quantizing them again to "
                  "int4 adds a second rounding (SmolLM2's Q4_1 GGUF: int4 loses much more than int4 of the original "
                  "weights). --quant int8 keeps them nearly as they are, or export the original Hugging Face "
                  "checkpoint.", file=sys.stderr)
    opts = ExportOptions(quant=quant, block_size=block_size, symmetric=not asymmetric, method=method,
                         embed_quant=embed_quant, lm_head_quant=lm_head_quant, quant_policy=quant_policy,
                         max_context=max_context, calib=calib, calib_tokens=calib_tokens, via=via, task=task)
    r = export_model(src, out, opts, force=force)
    m = r.manifest
    quantized = [t for t in m.tensors if t.dtype != "float32"]
    worst = max(quantized, key=lambda t: t.rms_rel_err, default=None)
    summary = dict(out=str(r.out), seconds=round(r.seconds, 1), peak_rss_mb=round(r.peak_rss_mb),
                   bundle_mb=round(r.bundle_mb, 1), parameters=m.model.num_parameters, quant=m.quant,
                   mean_rms_rel_err=round(sum(t.rms_rel_err for t in quantized) / len(quantized), 5) if quantized else 0.0,
                   worst_tensor=worst.name if worst else None,
                   worst_rms_rel_err=round(worst.rms_rel_err, 5) if worst else 0.0,
                   calibration=m.source.calibration)
    if as_json:
        print(json.dumps(summary))
        return
    print(f"wrote {r.out}  ({m.model.architecture} {m.task}, {m.model.num_parameters / 1e6:.0f}M parameters, "
          f"{m.quant}, {r.bundle_mb:.1f} MB)")
    if quantized:
        print(f"quantization error (relative RMS): mean {summary['mean_rms_rel_err']:.4f}, "
              f"worst {worst.rms_rel_err:.4f} ({worst.name}); per tensor in manifest.json")
    if m.source.calibration:
        print(f"calibrated on {m.source.calibration}")
    print(f"took {r.seconds:.1f} s, peak RSS {r.peak_rss_mb:.0f} MB")


@app.command()
def run(bundle: str, prompt: str, max_new_tokens: int = _MAX, temperature: Optional[float] = _TEMP,
        top_k: Optional[int] = _TOPK, top_p: Optional[float] = _TOPP, min_p: Optional[float] = _MINP,
        repetition_penalty: Optional[float] = _REP, seed: Optional[int] = _SEED, stop: Optional[List[str]] = _STOP,
        threads: Optional[int] = _THREADS, context: Optional[int] = _CTX, memory_budget: Optional[str] = _BUDGET,
        expert_policy: str = _POLICY, store: Optional[str] = _STORE, expert_slots: bool = _SLOTS,
        device: Optional[str] = _DEVICE, emulate: Optional[str] = _EMULATE,
        draft: Optional[str] = _DRAFT, draft_tokens: int = _DRAFT_TOKENS, prompt_lookup: Optional[int] = _LOOKUP,
        chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
        stats: bool = typer.Option(False, "--stats", help="Print speed after the text.")):
    """Generate from a prompt, streaming to the terminal ("-" reads the prompt from stdin)."""
    from .model import load
    require_task(bundle, "text-generation", "edge run")
    if prompt == "-":
        prompt = sys.stdin.read()
    if emulate:
        raise typer.Exit(run_emulated(emulate, bundle, _state["argv"], as_json=False))
    if device:
        threads, context, memory_budget = apply_device(bundle, device, threads=threads, context=context,
                                                       memory_budget=memory_budget)
    model = load(bundle, threads=threads, context_length=context, memory_budget=_process(memory_budget),
                 expert_policy=expert_policy, expert_store=store, expert_slots=expert_slots, draft=draft,
                 draft_tokens=draft_tokens, prompt_lookup=prompt_lookup)
    kw = _sampling(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop)
    from .progress import stderr_bar
    model.on_prefill = stderr_bar("prompt")
    pieces = model.chat([{"role": "user", "content": prompt}], stream=True, **kw) if chat else model.stream(prompt, **kw)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if stats:
        s = model.last_stats
        guesses = (f", {s.accepted}/{s.drafted} guesses kept, {s.tokens_per_forward:.2f} tokens a forward"
                   if s.drafted else "")
        print(f"[{s.prompt_tokens} prompt tokens at {s.prompt_tok_s:.1f} tok/s, {s.generated_tokens} generated at "
              f"{s.decode_tok_s:.1f} tok/s{guesses}, finish: {s.finish_reason}]", file=sys.stderr)


@app.command()
def chat(bundle: str, system: Optional[str] = typer.Option(None, help="System prompt."),
         max_new_tokens: int = _MAX, temperature: Optional[float] = _TEMP, top_k: Optional[int] = _TOPK,
         top_p: Optional[float] = _TOPP, min_p: Optional[float] = _MINP, repetition_penalty: Optional[float] = _REP,
         seed: Optional[int] = _SEED, threads: Optional[int] = _THREADS, context: Optional[int] = _CTX,
         memory_budget: Optional[str] = _BUDGET, expert_policy: str = _POLICY, store: Optional[str] = _STORE,
         expert_slots: bool = _SLOTS, draft: Optional[str] = _DRAFT, draft_tokens: int = _DRAFT_TOKENS,
         prompt_lookup: Optional[int] = _LOOKUP):
    """Interactive chat. Empty line or Ctrl-D ends; /reset forgets the conversation. When the
    conversation outgrows the context, the oldest turns are dropped (the system prompt is kept)."""
    from .model import load
    require_task(bundle, "text-generation", "edge chat")
    model = load(bundle, threads=threads, context_length=context, memory_budget=_process(memory_budget),
                 expert_policy=expert_policy, expert_store=store, expert_slots=expert_slots, draft=draft,
                 draft_tokens=draft_tokens, prompt_lookup=prompt_lookup)
    kw = _sampling(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, None)
    history = [{"role": "system", "content": system}] if system else []
    print(f"chatting with {bundle} (context {model.context_length} tokens); /reset forgets the conversation, "
          "an empty line or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line.strip():
            return
        if line.strip() == "/reset":
            history = history[:1] if system else []
            print("(conversation forgotten" + (", system prompt kept)" if system else ")"), file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        prepared = model.prepare_chat(history, reserve=min(max_new_tokens, model.context_length // 2))
        if prepared.dropped:
            history = history[:1] + history[1 + prepared.dropped:] if system else history[prepared.dropped:]
            print(f"(the conversation outgrew the {model.context_length}-token context: dropped the "
                  f"{prepared.dropped} oldest messages)", file=sys.stderr)
        reply = []

        def show(piece):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        try:
            model.complete_chat(prepared, on_piece=show, **kw)
        except KeyboardInterrupt:
            pass
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


@app.command()
def serve(bundle: str, host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface; "
                                                "then set --api-key)."),
          port: int = typer.Option(8000, help="TCP port."),
          api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY'."),
          name: Optional[str] = typer.Option(None, "--name", help="Model id clients send (default: the bundle's name)."),
          parallel: int = typer.Option(1, "--parallel", help="Model instances serving requests at once (each "
                                       "holds its own weights and KV cache)."),
          queue_size: int = typer.Option(8, "--queue", help="Requests that may wait; more get 503 with Retry-After."),
          threads: Optional[int] = _THREADS, context: Optional[int] = _CTX, memory_budget: Optional[str] = _BUDGET,
          expert_policy: str = _POLICY, store: Optional[str] = _STORE, expert_slots: bool = _SLOTS,
          device: Optional[str] = _DEVICE, draft: Optional[str] = _DRAFT, draft_tokens: int = _DRAFT_TOKENS,
          prompt_lookup: Optional[int] = _LOOKUP):
    """Serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models,
    /health): streaming, JSON-schema output, tool calls. Needs pip install "edge[serve]"."""
    from pathlib import Path
    from .model import load
    require_task(bundle, "text-generation", "edge serve")
    try:
        from .server import serve as run_server
        import uvicorn  # noqa: F401
    except ImportError:
        raise EdgeError('edge serve needs its extra: pip install "edge[serve]"') from None
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)
    if parallel < 1 or queue_size < 0:
        raise EdgeError("--parallel must be >= 1 and --queue >= 0")
    if device:
        threads, context, memory_budget = apply_device(bundle, device, threads=threads, context=context,
                                                       memory_budget=memory_budget)
    models = [load(bundle, threads=threads, context_length=context, memory_budget=_process(memory_budget),
                   expert_policy=expert_policy, expert_store=store, expert_slots=expert_slots, draft=draft,
                   draft_tokens=draft_tokens, prompt_lookup=prompt_lookup) for _ in range(parallel)]
    name = name or Path(bundle).resolve().name
    print(f"serving {name} on http://{host}:{port}/v1 ({parallel} instance(s), context {models[0].context_length})",
          file=sys.stderr)
    run_server(models, name=name, host=host, port=port, api_key=api_key, queue_size=queue_size)


@app.command()
def bench(bundle: str, threads: Optional[int] = _THREADS,
          prompt_tokens: int = typer.Option(128, help="Prompt length."),
          gen_tokens: int = typer.Option(128, help="Tokens to decode."),
          repeat: int = typer.Option(3, help="Timed runs (median reported) after one warm-up."),
          memory_budget: Optional[str] = _BUDGET, expert_policy: str = _POLICY, store: Optional[str] = _STORE,
          expert_slots: bool = _SLOTS, device: Optional[str] = _DEVICE, emulate: Optional[str] = _EMULATE,
          prefetch: Optional[bool] = typer.Option(None, "--prefetch/--no-prefetch", help="MoE under a budget: read "
                                                  "and build the experts the next layers will likely want in the "
                                                  "background (default: when the cache holds under half of them)."),
          sweep: Optional[str] = typer.Option(None, "--sweep", help="MoE: comma-separated budgets to run in turn, "
                                              "e.g. 350MB,450MB,700MB (each in a fresh process)."),
          plot: str = typer.Option("sweep.png", "--plot", help="With --sweep: PNG of tok/s and hit rate vs budget."),
          draft: Optional[str] = _DRAFT, draft_tokens: int = _DRAFT_TOKENS, prompt_lookup: Optional[int] = _LOOKUP,
          as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Measure load time, time to first token, prompt and decode speed, peak RSS (and, for MoE
    models, the expert cache: hit rate, bytes read per token, time stalled on misses)."""
    from .bench import bench as run_bench
    require_task(bundle, "text-generation", "edge bench")
    if emulate:
        raise typer.Exit(run_emulated(emulate, bundle, _state["argv"], as_json=as_json))
    if device:
        threads, _, memory_budget = apply_device(bundle, device, threads=threads, context=prompt_tokens + gen_tokens,
                                                 memory_budget=memory_budget)
    if sweep:
        from .bench import plot_sweep
        from .bench import sweep as run_sweep
        rows = run_sweep(bundle, [b.strip() for b in sweep.split(",") if b.strip()], threads=threads,
                         prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeat=repeat, expert_policy=expert_policy)
        if as_json:
            print(json.dumps(rows))
            return
        print(f"{'budget':>9} {'decode tok/s':>12} {'prompt tok/s':>12} {'peak RSS MB':>11} {'experts':>9} "
              f"{'hit rate':>8} {'MB read/tok':>11} {'stall ms/tok':>12}")
        for r in rows:
            if "error" in r:
                print(f"{r['budget']:>9}  {r['error']}")
                continue
            e = r["experts"] or {}
            print(f"{r['budget']:>9} {r['decode_tok_s']:>12.1f} {r['prompt_tok_s']:>12.1f} {r['peak_rss_mb']:>11.0f} "
                  f"{e.get('capacity', 0):>4}/{e.get('total', 0):<4} {e.get('hit_rate', 0):>8.1%} "
                  f"{e.get('mb_read_per_token', 0):>11.1f} {e.get('stall_ms_per_token', 0):>12.1f}")
        try:
            plot_sweep(rows, plot)
            print(f"plot: {plot}")
        except ImportError:
            print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return
    r = run_bench(bundle, threads=threads, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeat=repeat,
                  memory_budget=_process(memory_budget), expert_policy=expert_policy, prefetch=prefetch,
                  expert_store=store, expert_slots=expert_slots, draft=draft, draft_tokens=draft_tokens,
                  prompt_lookup=prompt_lookup)
    if as_json:
        print(json.dumps(r.as_dict()))
        return
    rows = [("bundle", r.bundle), ("quant", r.quant), ("threads", r.threads), ("load", f"{r.load_s:.2f} s"),
            ("time to first token", f"{r.ttft_s * 1000:.1f} ms ({r.prompt_tokens}-token prompt)"),
            ("prompt", f"{r.prompt_tok_s:.1f} tok/s"), ("decode", f"{r.decode_tok_s:.1f} tok/s ({r.gen_tokens} tokens)"),
            ("peak RSS", f"{r.peak_rss_mb:.0f} MB")]
    if r.speculation:
        sp = r.speculation
        rows.append(("speculative decoding", f"{sp['kind']}: {sp['acceptance']:.0%} of {sp['drafted']} guesses kept, "
                                             f"{sp['tokens_per_forward']:.2f} tokens a forward"))
    if r.experts:
        e = r.experts
        rows += [("expert cache", f"{e['capacity']} of {e['total']} experts resident, policy {e['policy']}"),
                 ("expert hit rate", f"{e['hit_rate']:.1%}"), ("read per token", f"{e['mb_read_per_token']:.1f} MB"),
                 ("expert loading", e["path"]),
                 ("stalled on misses", f"{e['stall_ms_per_token']:.1f} ms per token (reading "
                                       f"{e['read_ms_per_token']:.1f}"
                                       + (f", building sessions {e['build_ms_per_token']:.1f}" if e["build_ms_per_token"] else "")
                                       + (f", waiting for reads ahead {e['wait_ms_per_token']:.1f})"
                                          if e["wait_ms_per_token"] else ")"))]
        if "prefetch_precision" in e:
            rows.append(("next-layer guesses", f"precision {e['prefetch_precision']:.1%}, recall {e['prefetch_recall']:.1%}"
                         + (f"; read ahead: {e['prefetch_served']} misses served, {e['prefetch_wasted']} unused"
                            if e["prefetch"] else " (read-ahead off)")))
    print_table(rows)


def _attention_row(m) -> str:
    """The attention kind and what its cache costs a token."""
    if m.graph is None:
        return {"feature-extraction": "encoder (no cache)", "automatic-speech-recognition": "encoder-decoder"}[m.task]
    per_token = sum(c.bytes_per_token() for c in m.graph.cache)
    layers = max(1, m.model.num_layers)
    kind = {"mla": "multi-head latent (MLA)", "gqa": "grouped-query"}.get(m.model.attention, m.model.attention)
    return (f"{kind}; KV cache {per_token / 1024:.1f} KiB a token ({per_token / layers / 1024:.2f} KiB a layer), "
            f"{per_token * 4096 / 2**20:.0f} MB at 4096 tokens")


def _routing_row(moe) -> str:
    r = moe.routing
    parts = [f"{r.scoring}, top-{r.top_k} of {moe.num_experts}"]
    if r.groups > 1:
        parts.append(f"in the best {r.top_groups} of {r.groups} groups ({r.group_score.replace('_', ' ')})")
    if r.bias:
        parts.append("correction bias")
    parts.append("renormalised" if r.normalize else "not renormalised")
    if r.scale != 1.0:
        parts.append(f"x {r.scale:g}")
    return ", ".join(parts) + ("; fused graph" if moe.fused else "; staged (the runtime routes)")


@app.command()
def inspect(bundle: str, verify: bool = typer.Option(False, "--verify", help="Check every file's sha256."),
            tensors: bool = typer.Option(False, "--tensors", help="List every tensor with its quantization error."),
            as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON.")):
    """Summarise a bundle's manifest."""
    from .bundle import open_bundle
    b = open_bundle(bundle)
    m = b.manifest
    problems = b.verify() if verify else []
    if as_json:
        d = json.loads(m.to_json())
        if verify:
            d["verify"] = problems or "ok"
        print(json.dumps(d))
    else:
        s = m.model
        kinds = {}
        for t in m.tensors:
            kinds.setdefault(t.dtype, [0, 0])
            kinds[t.dtype][0] += 1
            n = 1
            for d in t.shape:
                n *= d
            kinds[t.dtype][1] += n
        methods = collections.Counter(t.method for t in m.tensors if t.dtype != "float32")
        rows = [("format", f"{m.format_version} ({m.producer})"), ("task", m.task), ("source", f"{m.source.path} ({m.source.format}, {m.source.dtype})"),
                ("architecture", f"{s.architecture}: {s.num_layers} layers, hidden {s.hidden_size}, heads {s.num_heads}/{s.num_kv_heads} "
                                 f"(q/kv), head_dim {s.head_dim}, ffn {s.intermediate_size}, vocab {s.vocab_size}"),
                ("attention", _attention_row(m)),
                ("parameters", f"{s.num_parameters / 1e6:.1f}M"), ("context", f"{s.max_context} tokens"),
                ("quantization", m.quant + "  (" + ", ".join(f"{k}: {v[0]} tensors / {v[1] / 1e6:.1f}M weights" for k, v in kinds.items()) + ")"),
                ("methods", ", ".join(f"{k}: {v} tensors" for k, v in sorted(methods.items())) or "none (fp32)"),
                ("calibration", m.source.calibration or "none (data-free)"),
                ("files", ", ".join(f"{f.path} {f.size / 2**20:.1f} MB" for f in m.files)),
                ("eos tokens", ", ".join(map(str, m.tokenizer.eos_token_ids))),
                ("chat template", "yes" if m.tokenizer.chat_template else "no")]
        if m.moe is not None:
            rows.insert(4, ("routing", _routing_row(m.moe)))
        if verify:
            rows.append(("verify", "ok: every sha256 matches" if not problems else "FAILED: " + "; ".join(problems)))
        print_table(rows)
        if tensors:
            print(f"\n{'tensor':<28} {'shape':<14} {'dtype':<8} {'block':>5} {'max rel':>9} {'rms rel':>9}")
            for t in m.tensors:
                print(f"{t.name:<28} {'x'.join(map(str, t.shape)):<14} {t.dtype:<8} {t.block_size or '':>5} "
                      f"{t.max_rel_err:>9.5f} {t.rms_rel_err:>9.5f}")
    if problems:
        raise EdgeError(f"{bundle} failed verification: " + "; ".join(problems) + ": export or copy it again")


@app.command("eval")
def eval_(bundle: List[str] = typer.Argument(..., help="Bundle(s); the first is the reference."),
          text: Optional[str] = typer.Option(None, "--text", help="UTF-8 text file to score."),
          tokens: Optional[str] = typer.Option(None, "--tokens", help="Token ids as little-endian uint16 (.u16)."),
          context: int = typer.Option(512, "--context", help="Window length in tokens."),
          stride: Optional[int] = typer.Option(None, "--stride", help="Window step (default: the context; "
                                               "smaller gives scored tokens more left context)."),
          max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Score only the first N tokens."),
          compare: Optional[List[str]] = typer.Option(None, "--compare", help="More bundles to score on the same "
                                                      "tokens (`--compare B2 B3`); deltas are against the first."),
          threads: Optional[int] = _THREADS, memory_budget: Optional[str] = _BUDGET,
          as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Perplexity on a text with a sliding window; with --compare, one table of bundles side by side
    (size, bits per weight, perplexity, delta, top-1 agreement with the first)."""
    from .evaluate import compare as run_compare
    bundles = [bundle[0], *(compare or []), *bundle[1:]]     # `--compare B2 B3`: B3 arrives as a positional
    for b in bundles:
        require_task(b, "text-generation", "edge eval")
    for path in (text, tokens):
        if path is not None and not os.path.isfile(path):     # before any model loads
            raise EdgeError(f"{path}: no such file")

    def show(r):
        if not as_json:
            print(f"  {r.bundle}: perplexity {r.perplexity:.4f} over {r.tokens_scored} tokens ({r.tok_s:.0f} tok/s)",
                  file=sys.stderr)
    rows = run_compare(bundles, text=text, tokens=tokens, context=context, stride=stride, max_tokens=max_tokens,
                       threads=threads, memory_budget=_process(memory_budget), progress=show)
    if as_json:
        print(json.dumps([r.as_dict() for r in rows]))
        return
    r0 = rows[0]
    print(f"{r0.tokens_scored} tokens scored, windows of {r0.context} every {r0.stride}\n")
    w = max(len(r.bundle) for r in rows)
    print(f"{'bundle':<{w}} {'quant':<6} {'MB':>8} {'bits/w':>6} {'perplexity':>10} {'delta':>8} {'top-1 agree':>11} "
          f"{'tok/s':>7}")
    for r in rows:
        delta = "" if r.delta_pct is None else f"{r.delta_pct:+.2f}%"
        agree = "" if r.top1_agreement is None else f"{r.top1_agreement:.2%}"
        print(f"{r.bundle:<{w}} {r.quant:<6} {r.size_mb:>8.1f} {r.bits_per_weight:>6.2f} {r.perplexity:>10.4f} "
              f"{delta:>8} {agree:>11} {r.tok_s:>7.0f}")


@app.command()
def prepare(bundle: str, store: Optional[str] = _STORE,
            force: bool = typer.Option(False, "--force", help="Make the store again even if it matches."),
            as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")):
    """Pack a Mixture-of-Experts bundle's experts for this machine (onnxruntime's own prepacked bytes,
    one record per expert), so that an expert cache miss is one read. A budgeted run does it on first
    use; do it ahead on the device. A no-op when a store for this bundle, onnxruntime and CPU is there."""
    from .model import prepare as make
    r = make(bundle, expert_store=store, force=force, progress=not as_json)
    h = r.store.header
    info = dict(store=str(r.store.root), built=r.built, reason=r.reason, seconds=round(r.seconds, 2),
                disk_mb=round(r.bytes / 2**20, 1), experts=h.experts, record_mb=round(h.record_size / 2**20, 3),
                onnxruntime=h.onnxruntime, cpu=h.cpu)
    if as_json:
        print(json.dumps(info))
        return
    print_table([("store", info["store"]),
                 ("made now", f"yes ({r.reason}), in {r.seconds:.1f} s" if r.built else "no: it matches this bundle, "
                  "onnxruntime and CPU"),
                 ("on disk", f"{info['disk_mb']:.0f} MB: {h.experts} experts, {h.record_size / 2**20:.2f} MB a record"),
                 ("made for", f"onnxruntime {h.onnxruntime}, {h.cpu.split(':')[0]}")])


def _process(memory_budget: Optional[str]):
    """--memory-budget bounds the whole process: the model gets it less what the process holds now."""
    from .moe import process_budget
    return None if memory_budget is None else process_budget(memory_budget)


app.add_typer(devices_app, name="devices")
app.command("plan")(plan_command)
app.command("embed")(embed_command)
app.command("transcribe")(transcribe_command)


def main(argv: list[str] | None = None) -> int:
    _state["argv"] = list(sys.argv[1:] if argv is None else argv)
    try:
        rc = app(args=argv, standalone_mode=False)     # a typer.Exit(n) comes back as n here
        return rc if isinstance(rc, int) else 0
    except EdgeError as e:
        if _state["debug"]:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (typer.Exit, SystemExit) as e:
        return getattr(e, "exit_code", getattr(e, "code", 0)) or 0
    except OSError as e:                            # a file that is missing or unreadable: one line
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything unexpected: one line, the traceback with --debug
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()            # a usage error (click's, or the click typer bundles): the usage line, a hint, exit 2
            return e.exit_code
        if _state["debug"]:
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def entry() -> None:
    sys.exit(main())
