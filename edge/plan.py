"""What fits on a device: `plan(manifest, device, context)` -> Plan.

Estimated from the manifest alone (no model is loaded, so it works for a target board from the dev
machine). The resident costs below were measured on x86-64 with onnxruntime 1.32; ARM kernels pack
differently, so treat them as estimates. At run time the MoE budget planner (edge/moe.py) measures
the real costs on the device and sizes the expert cache so that the budget holds whatever these
estimates said.

    budget        = min(device RAM - OS headroom, --memory-budget, what the whole model needs)
    expert cache  = (budget - dense part - KV cache - headroom) / cost per cached expert
    decode speed  = bytes a token reads / the reference host's rate x the device's memory-speed factor;
                    under a budget the staged pipeline's slower compute plus the time to read missed
                    experts at the device's storage speed (a range: routing with no locality .. the
                    locality SmolMoE's trained routers show)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .devices import Device
from .errors import BudgetError
from .manifest import Manifest
from .experts import packed_factor
from .moe import HEADROOM, SLOT_MARGIN  # as the runtime planner reserves

RUNTIME_MB = 56              # python + onnxruntime + numpy + tokenizers, imported (VmRSS)
# MoE under a budget: resident bytes per byte of stage weights, prepacked copies and the file pages a
# prompt reads again (SmolMoE int4: the runtime measures 183 MB beyond the imports for 58.7 MB of
# stage weights and a 3.4 MB tokenizer)
STAGED_RESIDENT = 2.9
# a dense bundle's peak RSS per byte of its weight file, by quantization (SmolLM2 at context 256,
# measured with `edge bench`: fp32 721 MB for 511 MB of weights (the tied head stored once), int8 361
# for 147, int4 254 for 88;
# MatMulNBits' packed copies carry fp32 scales and block sums)
DENSE_RESIDENT = {"fp32": 1.2, "int8": 1.6, "int4": 1.5}
TOKENIZER_FACTOR = 4.0       # the tokenizers library's memory per byte of tokenizer.json
# reference host (2 threads): weight bytes a decode streams per second. Quantized kernels
# (MatMulNBits) dequantize as they go; fp32 MatMul streams faster. Measured with `edge bench`:
# SmolLM2 int8 147 MB a token at 150 tok/s, int4 88 MB at 230, SmolMoE int4 fused 140 MB active at
# 155 (21-22 GB/s); SmolLM2 fp32 515 MB at 68.6 (37 GB/s)
REF_GB_S = {"fp32": 37.0, "quantized": 21.0}
# the staged pipeline (one session per layer part, experts run one by one) over the fused graph, per
# token: SmolMoE int4 computes a token in ~10 ms staged and 6.4 ms fused (`edge bench` at 500/400 MB)
STAGED_FACTOR = 1.55
# miss rate = (1 - fraction cached) ** LOCALITY: uniform routing gives 1; SmolMoE's trained routers
# with the LFU cache measure 18% misses at 48% cached and 47% at 22% (exponents 2.6 and 2.9)
LOCALITY = 2.7
# bytes read per missed expert's bytes: the read-ahead's wrong guesses (SmolMoE: 1.55-1.7)
READ_AHEAD_FACTOR = 1.6
MiB = 2 ** 20


@dataclass(frozen=True)
class Plan:
    device: str
    context: int
    threads: int
    usable_mb: float              # device RAM - OS headroom, or the memory budget where smaller
    dense_mb: float               # weights outside the experts, runtime, tokenizer
    kv_cache_mb: float            # at the full context
    headroom_mb: float
    per_expert_mb: float          # MoE: one cached expert
    experts_total: int
    experts_cached: int
    need_all_mb: float            # everything resident
    budget_mb: float              # what `edge run --device` passes as memory_budget (MoE) or must fit (dense)
    decode_tok_s: tuple[float, float] | None    # (low, high) estimate, None without a speed factor
    notes: tuple[str, ...]

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def memory_budget(self) -> str:
        return f"{int(self.budget_mb)}MB"


def _mb(nbytes: float) -> float:
    return round(nbytes / MiB, 1)


def plan(m: Manifest, device: Device, *, context: int | None = None, memory_budget: int | None = None) -> Plan:
    """memory_budget (bytes, the whole process as `--memory-budget` means it) lowers the device's memory."""
    ctx = min(context or 4096, m.model.max_context)
    g = m.graph
    kv = g.cache_bytes(ctx)
    sizes = {f.path: f.size for f in m.files}
    moe = m.moe
    if moe is not None:           # under a budget the staged path runs: stage graphs + their data
        graph_files = [st.file for st in moe.stages]
    else:
        graph_files = [g.file]
    weights = sum(sizes.get(p, 0) for p in (*graph_files, *g.data))
    if not g.data:                # older bundles do not name their data files: count all but the expert store
        skip = {m.tokenizer.file, m.tokenizer.chat_template} | ({moe.expert_file} if moe else set())
        weights = sum(s for p, s in sizes.items() if p not in skip)
    tok = sizes.get(m.tokenizer.file, 0)
    if moe is not None:           # prepacked weights + the file pages of the same weights prompts read again
        dense = RUNTIME_MB * MiB + STAGED_RESIDENT * weights + TOKENIZER_FACTOR * tok
    else:                         # a dense decoder drops its file pages after load (edge/engine.py)
        dense = RUNTIME_MB * MiB + DENSE_RESIDENT.get(m.quant, 1.6) * weights + TOKENIZER_FACTOR * tok
    blob = max((x.size for x in moe.experts), default=0) if moe else 0
    per_expert = SLOT_MARGIN * packed_factor(m) * blob if moe else 0.0        # an expert slot
    n_experts = len(moe.experts) if moe else 0
    fixed = dense + kv + HEADROOM
    need_all = fixed + per_expert * n_experts
    usable = device.usable_mb * MiB if memory_budget is None else min(device.usable_mb * MiB, memory_budget)
    notes = [] if g.data else ["the manifest names no data files (older export): dense part over-estimated"]
    if fixed + (2 * per_expert if moe else 0) > usable:
        raise BudgetError(f"{m.model.architecture} ({m.quant}) does not fit {device.name} at context {ctx}: it needs "
                          f"at least {_mb(fixed + 2 * per_expert):.0f} MB (dense part {_mb(dense):.0f} + KV cache "
                          f"{_mb(kv):.0f} + headroom {_mb(HEADROOM):.0f}) but "
                          + (f"the device leaves {device.usable_mb} MB after {device.headroom_mb} MB for the OS"
                             if memory_budget is None else f"the memory budget is {_mb(usable):.0f} MB")
                          + "; try a shorter --context or a smaller quantization")
    budget = min(usable, need_all)
    cached = n_experts if moe is None or budget >= need_all else int((budget - fixed) // per_expert)
    if moe and cached < n_experts:
        notes.append(f"{cached} of {n_experts} experts fit ({cached / n_experts:.0%}); misses are read from "
                     f"{device.storage_kind} at " + (f"~{device.storage_read_mb_s:.0f} MB/s" if device.storage_read_mb_s
                                                     else "a speed not measured (not in the estimate)"))
    big = max(device.clusters, key=lambda c: (c.ghz, c.count)) if device.clusters else None
    threads = big.count if big else device.cores
    speed = _speed(m, device, weights, blob, cached, n_experts)
    if speed is None:
        notes.append("no decode estimate: the device has no decode_speed_estimate")
    notes.append("estimates: resident costs were measured on x86-64; the runtime measures them again on the device")
    return Plan(device=device.name, context=ctx, threads=threads, usable_mb=_mb(usable),
                dense_mb=_mb(dense), kv_cache_mb=_mb(kv), headroom_mb=_mb(HEADROOM), per_expert_mb=_mb(per_expert),
                experts_total=n_experts, experts_cached=cached, need_all_mb=_mb(need_all), budget_mb=_mb(budget),
                decode_tok_s=speed, notes=tuple(notes))


def _speed(m: Manifest, device: Device, dense_bytes: float, blob: float, cached: int, total: int):
    """(low, high) decode tok/s: compute at the device's speed plus reads of missed experts."""
    if not device.decode_speed_estimate:
        return None
    k = m.moe.top_k * m.model.num_layers if m.moe else 0
    names = {t.name: t for t in m.tensors}
    if "lm_head" in names and "embed" in names:      # an embedding that is not also the head is only gathered
        embed = names["embed"]
        n = 1
        for d in embed.shape:
            n *= d
        dense_bytes -= n * {"float32": 4, "int8": 1, "int4": 0.5}.get(embed.dtype, 4)
    active = dense_bytes + k * blob
    rate = REF_GB_S["fp32" if m.quant == "fp32" else "quantized"]
    compute_s = active / (rate * 1e9 * device.decode_speed_estimate)
    if not total or cached >= total:
        t = compute_s
        return (round(0.7 / t, 1), round(1.2 / t, 1))
    staged_s = compute_s * STAGED_FACTOR
    read = READ_AHEAD_FACTOR * k * blob / (device.storage_read_mb_s * MiB) if device.storage_read_mb_s else 0.0
    worst, best = 1 - cached / total, (1 - cached / total) ** LOCALITY    # miss rates
    return (round(1 / (staged_s + worst * read), 1), round(1 / (staged_s + best * read), 1))
