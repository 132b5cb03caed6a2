"""Attention builders: a layer from its input norm to its post-attention norm. An architecture picks
one (DecoderArch.attention); each returns the MLP's input, the residual stream and the layer's
cache buffers (edge/manifest.py CacheBuffer), which the runtime allocates and binds as listed.

gqa: grouped-query attention (Llama, Mistral, Qwen, Mixtral ...), onnxruntime's GroupQueryAttention
     with rotary inside and keys and values written in place:
        x ─► Linear q|k|v ─► [q/k RMSNorm] ─► GroupQueryAttention(past_key.i, past_value.i) ─► Linear o

mla: multi-head latent attention (DeepSeek-V2/V3). Keys and values are one compressed latent per
     token c (rank r) plus a rotary key k_pe shared by every head; the cache holds [c ; k_pe] a
     token. The key and value up-projections (kv_b = W_UK | W_UV per head) are absorbed into the
     query and output sides, so no step re-expands the cache:
        q_h  = W_q x                 [dn + dr]   (or q_b(RMSNorm(q_a x)) with a q LoRA)
        c, k_pe = kv_a x ; c = RMSNorm(c)        rotary on q_pe and k_pe (interleaved pairs or halves)
        score_h(t) = (q_nope_h W_UK_h) . c_t + q_pe_h . k_pe_t        x softmax scale
        out_h = W_UV_h Σ_t softmax(score_h)(t) c_t ;  o = W_o [out_1 .. out_NH]
     The past tokens' rows are read in place (a view of the cache); the step's new rows are the
     graph's output, written behind them by the runtime.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import numpy as np
from onnx import TensorProto

from edge.manifest import CacheBuffer

from .decoder import MS, QuantPolicy, StepInputs, _Emitter, _rms, _skip_rms
from .onnx_graph import Graph
from .quant import QuantScheme

if TYPE_CHECKING:
    from .arch.common import DecoderArch


def _without_gptq(scheme: QuantScheme | None) -> QuantScheme | None:
    return dataclasses.replace(scheme, method="mse") if scheme is not None and scheme.method == "gptq" else scheme


def _head_rms(g: Graph, em: _Emitter, x: str, w: np.ndarray, heads: int, d: int, eps: float, name: str) -> str:
    """RMSNorm over each head's d values: [1,S,heads*d] -> [1,S,heads,d] -> norm -> [1,S,heads*d]."""
    x4 = g.op1("Reshape", [x, g.weight(name + ".shape4", np.array([0, 0, heads, d], np.int64))], name=name + "/split_heads")
    y = _rms(g, x4, em.plain(name, w), eps, name)
    return g.op1("Reshape", [y, g.weight(name + ".shape3", np.array([0, 0, heads * d], np.int64))], name=name + "/merge_heads")


def _input_norm(g: Graph, em: _Emitter, arch: DecoderArch, w, i: int, h: str, residual: str | None) -> tuple[str, str]:
    p, eps = f"layers.{i}.", arch.spec.norm_eps
    if residual is None:
        return _rms(g, h, em.plain(p + "input_norm", w("input_norm")), eps, p + "input_norm"), h
    return _skip_rms(g, h, residual, em.plain(p + "input_norm", w("input_norm")), eps, p + "input_norm")


def gqa(g: Graph, em: _Emitter, arch: DecoderArch, get: Callable[[str], np.ndarray], i: int, h: str,
        residual: str | None, step: StepInputs, policy: QuantPolicy) -> tuple[str, str, list[CacheBuffer]]:
    """Layer i up to its MLP with grouped-query attention (KV in place)."""
    s = arch.spec
    D, KV, NH = s.head_dim, s.num_kv_heads, s.num_heads
    n = arch.layer_names(i)
    p = f"layers.{i}."
    w = lambda role: get(n[role])
    b = lambda role: get(n[role + "_bias"]) if role + "_bias" in n else None
    x, residual = _input_norm(g, em, arch, w, i, h, residual)
    # q, k and v keep the calibrated mse search under --method gptq: GPTQ made them worse (SmolLM2 int4,
    # 4096 held-out tokens through transformers: perplexity 18.42 with gptq on q/k/v, 17.24 with mse
    # everywhere, 16.54 with gptq on everything but q/k/v). The manifest records mse for them. They are
    # one projection at one precision: fused q|k|v rows [(NH + 2 KV) * D, H] (three reading the same x
    # cost SmolMoE ~8% of decode speed).
    wqkv = np.concatenate([w("q"), w("k"), w("v")], axis=0)
    bqkv = np.concatenate([b("q"), b("k"), b("v")]) if "q_bias" in n else None
    qkv = em.linear(x, wqkv, p + "qkv", _without_gptq(policy.attention_qkv), bqkv)
    del wqkv
    if s.qk_norm:
        q, k, v = g.op("Split", [qkv, g.weight(p + "qkv.split", np.array([NH * D, KV * D, KV * D], np.int64))],
                       3, name=p + "qkv_split", axis=-1)
        if s.qk_norm == "head":
            q = _head_rms(g, em, q, w("q_norm"), NH, D, s.norm_eps, p + "q_norm")
            k = _head_rms(g, em, k, w("k_norm"), KV, D, s.norm_eps, p + "k_norm")
        else:              # one RMSNorm over the whole projection
            q = _rms(g, q, em.plain(p + "q_norm", w("q_norm")), s.norm_eps, p + "q_norm")
            k = _rms(g, k, em.plain(p + "k_norm", w("k_norm")), s.norm_eps, p + "k_norm")
        attn_in = [q, k, v]
    else:
        attn_in = [qkv, "", ""]
    cache = [CacheBuffer(input=f"past_{r}.{i}", output=f"present_{r}.{i}", shape=(1, KV, -1, D), dtype="float32",
                         update="in_place") for r in ("key", "value")]
    for c in cache:
        g.input(c.input, TensorProto.FLOAT, [1, KV, "max_context", D])
        g.output(c.output, TensorProto.FLOAT, [1, KV, "max_context", D])
    attrs = dict(num_heads=NH, kv_num_heads=KV, do_rotary=1, rotary_interleaved=0, scale=float(D) ** -0.5)
    if s.sliding_window:
        attrs["local_window_size"] = s.sliding_window
    attn = g.op("GroupQueryAttention", attn_in + [cache[0].input, cache[1].input, step.seqlens_k, step.total,
                                                  step.cos, step.sin], 3,
                name=p + "attn", outputs=[g.fresh(p + "attn/out"), cache[0].output, cache[1].output], domain=MS,
                **attrs)[0]
    o = em.linear(attn, w("o"), p + "o", policy.attention, b("o"))
    x, residual = _skip_rms(g, o, residual, em.plain(p + "post_norm", w("post_norm")), s.norm_eps, p + "post_norm")
    return x, residual, cache


def _const(g: Graph, name: str, values, dtype=np.int64) -> str:
    return g.weight(name, np.array(values, dtype))


def _positions(g: Graph, step: StepInputs, x: str, p: str) -> tuple[str, str]:
    """(positions [S] int64 of the step's tokens: total - S .. total - 1, S as [1] int64)."""
    s_len = g.op1("Shape", [x], name=p + "seq_len", start=1, end=2)                           # [1]
    total = g.op1("Cast", [step.total], name=p + "total64", to=TensorProto.INT64)             # []
    start = g.op1("Sub", [total, g.op1("Squeeze", [s_len], name=p + "seq_len0")], name=p + "start")
    return g.op1("Range", [start, total, _const(g, p + "one", 1)], name=p + "positions"), s_len


def _rotary(g: Graph, x: str, cos: str, sin: str, dim: int, interleaved: bool, name: str) -> str:
    """Rotate the last axis (`dim` values) of x [..., S, dim] by angles cos, sin [S, dim / 2]: pairs
    (2j, 2j+1) when interleaved (DeepSeek's layout), else (j, j + dim / 2) (rotate-half)."""
    half = dim // 2
    if interleaved:
        pairs = g.op1("Reshape", [x, _const(g, name + ".pairs", [0, 0, 0, half, 2])], name=name + "/pairs")
        a, b = (g.op1("Squeeze", [t, _const(g, name + f".ax{j}", [-1])], name=name + f"/sq{j}") for j, t in
                enumerate(g.op("Split", [pairs], 2, name=name + "/split", axis=-1, num_outputs=2)))
    else:
        a, b = g.op("Split", [x], 2, name=name + "/split", axis=-1, num_outputs=2)
    ra = g.op1("Sub", [g.op1("Mul", [a, cos], name=name + "/ac"), g.op1("Mul", [b, sin], name=name + "/bs")], name=name + "/ra")
    rb = g.op1("Add", [g.op1("Mul", [b, cos], name=name + "/bc"), g.op1("Mul", [a, sin], name=name + "/as")], name=name + "/rb")
    if interleaved:
        both = g.op1("Concat", [g.op1("Unsqueeze", [t, _const(g, name + f".ux{j}", [-1])], name=name + f"/u{j}")
                                for j, t in enumerate((ra, rb))], name=name + "/join", axis=-1)
        return g.op1("Reshape", [both, _const(g, name + ".flat", [0, 0, 0, dim])], name=name + "/flat")
    return g.op1("Concat", [ra, rb], name=name + "/join", axis=-1)


def mla(g: Graph, em: _Emitter, arch: DecoderArch, get: Callable[[str], np.ndarray], i: int, h: str,
        residual: str | None, step: StepInputs, policy: QuantPolicy) -> tuple[str, str, list[CacheBuffer]]:
    """Layer i up to its MLP with multi-head latent attention (the module docstring's math)."""
    s, m = arch.spec, arch.mla
    NH, dn, dr, dv, r = s.num_heads, m.nope_dim, m.rope_dim, m.v_dim, m.kv_rank
    n = arch.layer_names(i)
    p = f"layers.{i}."
    w = lambda role: get(n[role])
    x, residual = _input_norm(g, em, arch, w, i, h, residual)
    qkv_scheme = _without_gptq(policy.attention_qkv)
    if m.q_rank:                                                     # the q LoRA: q_b(RMSNorm(q_a(x)))
        qa = em.linear(x, w("q_a"), p + "q_a", qkv_scheme)
        qa = _rms(g, qa, em.plain(p + "q_a_norm", w("q_a_norm")), m.latent_eps, p + "q_a_norm")
        q = em.linear(qa, w("q_b"), p + "q_b", qkv_scheme)
    else:
        q = em.linear(x, w("q"), p + "q", qkv_scheme)                                     # [1, S, NH (dn + dr)]
    q = g.op1("Transpose", [g.op1("Reshape", [q, _const(g, p + "q.heads", [0, 0, NH, dn + dr])], name=p + "q/heads")],
              name=p + "q/by_head", perm=[0, 2, 1, 3])                                     # [1, NH, S, dn + dr]
    q_nope, q_pe = g.op("Split", [q, _const(g, p + "q.split", [dn, dr])], 2, name=p + "q/split", axis=-1)
    kv = em.linear(x, w("kv_a"), p + "kv_a", qkv_scheme)                                  # [1, S, r + dr]
    c, k_pe = g.op("Split", [kv, _const(g, p + "kv_a.split", [r, dr])], 2, name=p + "kv_a/split", axis=-1)
    c = _rms(g, c, em.plain(p + "kv_a_norm", w("kv_a_norm")), m.latent_eps, p + "kv_a_norm")  # [1, S, r]
    positions, s_len = _positions(g, step, x, p)
    cos = g.op1("Gather", [step.cos, positions], name=p + "cos", axis=0)                    # [S, dr / 2]
    sin = g.op1("Gather", [step.sin, positions], name=p + "sin", axis=0)
    q_pe = _rotary(g, q_pe, cos, sin, dr, m.interleaved, p + "q_rope")                       # [1, NH, S, dr]
    k_pe = g.op1("Unsqueeze", [k_pe, _const(g, p + "axis1", [1])], name=p + "k_pe/one_head")   # [1, 1, S, dr]
    k_pe = g.op1("Squeeze", [_rotary(g, k_pe, cos, sin, dr, m.interleaved, p + "k_rope"), _const(g, p + "axis1b", [1])],
                 name=p + "k_pe/rows")                                                       # [1, S, dr]
    cache = CacheBuffer(input=f"past_latent.{i}", output=f"present_latent.{i}", shape=(1, -1, r + dr),
                        dtype="float32", update="append")
    g.input(cache.input, TensorProto.FLOAT, [1, "past_tokens", r + dr])
    g.op("Concat", [c, k_pe], name=p + "latent", outputs=[cache.output], axis=-1)            # [1, S, r + dr]
    g.output(cache.output, TensorProto.FLOAT, [1, "S", r + dr])
    # absorbed up-projections: kv_b [NH (dn + dv), r] -> W_UK [NH, dn, r], W_UV^T [NH, r, dv] (fp32)
    kv_b = w("kv_b").reshape(NH, dn + dv, r)
    uk = em.plain(p + "kv_b.k", np.ascontiguousarray(kv_b[:, :dn, :]))
    uv = em.plain(p + "kv_b.v", np.ascontiguousarray(kv_b[:, dn:, :].transpose(0, 2, 1)))
    q_lat = g.op1("MatMul", [q_nope, uk], name=p + "q_absorb")                               # [1, NH, S, r]
    qq = g.op1("Concat", [q_lat, q_pe], name=p + "q_latent", axis=-1)                        # [1, NH, S, r + dr]
    one = _const(g, p + "axis1c", [1])
    past = g.op1("Unsqueeze", [cache.input, one], name=p + "past/one_head")                  # [1, 1, P, r + dr]
    new = g.op1("Unsqueeze", [cache.output, one], name=p + "new/one_head")                   # [1, 1, S, r + dr]
    to_past = g.op1("FusedMatMul", [qq, past], name=p + "scores_past", domain=MS, transB=1, alpha=m.scale)
    to_new = g.op1("FusedMatMul", [qq, new], name=p + "scores_new", domain=MS, transB=1, alpha=m.scale)
    # a new token sees the new tokens up to itself: -inf above the diagonal of [S, S]
    steps = g.op1("Range", [_const(g, p + "zero", 0), g.op1("Squeeze", [s_len], name=p + "s0"), _const(g, p + "one1", 1)],
                  name=p + "steps")
    later = g.op1("Greater", [g.op1("Unsqueeze", [steps, _const(g, p + "ax0", [0])], name=p + "cols"),
                              g.op1("Unsqueeze", [steps, _const(g, p + "ax1", [1])], name=p + "rows")], name=p + "later")
    mask = g.op1("Where", [later, g.weight(p + "neg_inf", np.array(-np.inf, np.float32)),
                           g.weight(p + "zero_f", np.array(0, np.float32))], name=p + "causal")   # [S, S]
    probs = g.op1("Softmax", [g.op1("Concat", [to_past, g.op1("Add", [to_new, mask], name=p + "masked")],
                                    name=p + "scores", axis=-1)], name=p + "probs", axis=-1)   # [1, NH, S, P + S]
    n_past = g.op1("Shape", [cache.input], name=p + "past_len", start=1, end=2)
    p_past, p_new = g.op("Split", [probs, g.op1("Concat", [n_past, s_len], name=p + "split_at", axis=0)], 2,
                         name=p + "probs/split", axis=-1)
    mixed = g.op1("Add", [g.op1("MatMul", [p_past, past], name=p + "mix_past"),
                          g.op1("MatMul", [p_new, new], name=p + "mix_new")], name=p + "mix")   # [1, NH, S, r + dr]
    lat = g.op1("Slice", [mixed, _const(g, p + "lat.lo", [0]), _const(g, p + "lat.hi", [r]), _const(g, p + "lat.ax", [-1])],
                name=p + "mix/latent")                                                        # [1, NH, S, r]
    heads = g.op1("MatMul", [lat, uv], name=p + "v_absorb")                                   # [1, NH, S, dv]
    flat = g.op1("Reshape", [g.op1("Transpose", [heads], name=p + "attn/by_token", perm=[0, 2, 1, 3]),
                             _const(g, p + "attn.flat", [0, 0, NH * dv])], name=p + "attn/flat")   # [1, S, NH dv]
    o = em.linear(flat, w("o"), p + "o", policy.attention)
    x, residual = _skip_rms(g, o, residual, em.plain(p + "post_norm", w("post_norm")), s.norm_eps, p + "post_norm")
    return x, residual, [cache]
