"""Build the decoder ONNX graph of a dense Llama-family model, one tensor at a time.

    input_ids [1,S] ─► Embed (Gather | GatherBlockQuantized) ─► h [1,S,H]
    for each layer:
        (Skip)SimplifiedLayerNorm(h + residual) ─► x, residual
        x ─► Linear qkv (fused q|k|v rows) ─► [q/k RMSNorm per head] ─► GroupQueryAttention ─► Linear o
              past_key.i / past_value.i ──┘ (rotary inside, KV written in place) └─► present_key.i / present_value.i
        SkipSimplifiedLayerNorm(o + residual) ─► x, residual
        x ─► Linear gate|up (fused) ─► Split ─► SiLU(gate) * up ─► Linear down ─► h
    SkipSimplifiedLayerNorm(h + residual) ─► Gather(logits_positions, axis 1) ─► Linear lm_head ─► logits [1,P,V]

Linear = MatMulNBits (int4/int8, accuracy_level 4) or MatMul (fp32). GroupQueryAttention's
past and present share one [1, kv_heads, max_context, head_dim] buffer per layer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np
from onnx import TensorProto

from edge.manifest import GraphSpec, ModelSpec, TensorEntry

from .arch.common import DecoderArch
from .onnx_graph import Graph
from .quant import QuantScheme, quantize
from .rope import tables

if TYPE_CHECKING:
    from .calib import Activations

MS = "com.microsoft"


@dataclass(frozen=True)
class QuantPolicy:
    """Which scheme each kind of weight gets (None = fp32)."""
    attention: QuantScheme | None          # o projection (q, k, v: attention_qkv, which defaults to it); int8 in an int4 MoE
    mlp: QuantScheme | None                # dense (and shared-expert) gate|up
    mlp_down: QuantScheme | None           # dense (and shared-expert) down
    experts: QuantScheme | None            # routed experts' gate|up
    experts_down: QuantScheme | None       # routed experts' down
    embed: QuantScheme | None
    lm_head: QuantScheme | None
    attention_qkv: QuantScheme | None      # q, k and v: one fused projection (llama.cpp keeps a MoE's k, v at Q8_0)


@dataclass(frozen=True)
class Tied:
    """An embedding's bytes in the data file, reusable as the tied lm_head: quantized, the
    GatherBlockQuantized data [V, H] is byte for byte MatMulNBits' B [V, H / block, block * bits / 8];
    fp32 (scheme None), the head is a MatMul over its transpose, which onnxruntime folds at load."""
    scheme: QuantScheme | None
    qweight_offset: int                # (fp32: the embedding's own offset)
    scales_offset: int                 # (fp32: -1)
    shape: tuple[int, int]             # [V, H]


class _Emitter:
    """Adds weights to the graph and records each one's manifest entry."""

    def __init__(self, g: Graph, *, half_scales: bool = True, calibration: Mapping[str, Activations] | None = None):
        self.g = g
        self.half_scales = half_scales     # store fp16 scales as fp16 (False: fp32 in the graph, as the expert
                                           #   graph takes them; export/moe.py halves them in the store)
        # tensor name -> its input's statistics (export/calib.py; an MoE's are streamed: never ask its len)
        self.calibration = {} if calibration is None else calibration
        self.entries: list[TensorEntry] = []
        self.num_parameters = 0
        self.tied: Tied | None = None      # set by an embedding stored in the data file

    def record(self, name: str, w: np.ndarray, scheme: QuantScheme | None, max_rel=0.0, rms_rel=0.0, *,
               calibrated: bool = False) -> None:
        self.num_parameters += int(w.size)
        if scheme is None:
            self.entries.append(TensorEntry(name=name, shape=tuple(w.shape), dtype="float32"))
        else:
            self.entries.append(TensorEntry(name=name, shape=tuple(w.shape), dtype=scheme.dtype, method=scheme.method,
                                            block_size=scheme.block_size, symmetric=scheme.symmetric,
                                            scale_dtype=self.scale_dtype(scheme),
                                            max_rel_err=max_rel, rms_rel_err=rms_rel, calibrated=calibrated))

    def scale_dtype(self, scheme: QuantScheme) -> str:
        """How this emitter stores the scales of `scheme`."""
        return "float16" if self.half_scales and scheme.scale_dtype == "float16" else "float32"

    def scales(self, name: str, scales: np.ndarray, scheme: QuantScheme) -> str:
        """The fp32 scales input of a quantized op. Stored as fp16 when the scheme says so (the values
        are fp16-exact) behind a Cast that onnxruntime folds into an fp32 constant at load:

            name.scales (fp16, in the data file) -> Cast(to=float) -> the op's scales input
        """
        return self.as_fp32(name, self.g.weight(name + ".scales", scales.astype(self.scale_dtype(scheme))), scheme)

    def as_fp32(self, name: str, stored: str, scheme: QuantScheme) -> str:
        """Stored scales `stored` as the fp32 input the op takes (a Cast when they are stored as fp16)."""
        if self.scale_dtype(scheme) == "float32":
            return stored
        return self.g.op1("Cast", [stored], name=name + "/scales", to=TensorProto.FLOAT)

    def plain(self, name: str, w: np.ndarray) -> str:
        self.record(name, w, None)
        return self.g.weight(name, w.astype(np.float32))

    def linear(self, x: str, w: np.ndarray, name: str, scheme: QuantScheme | None, bias: np.ndarray | None = None,
               *, out: str | None = None) -> str:
        """y = x @ w.T (+ bias); w is [N, K] as in a Hugging Face Linear. `out` names the result."""
        n, k = w.shape
        outs = [out] if out else None
        if scheme is None:
            self.record(name, w, None)
            wt = self.g.weight(name, np.ascontiguousarray(w.T, np.float32))
            if bias is None:
                return self.g.op("MatMul", [x, wt], name=name, outputs=outs)[0]
            y = self.g.op1("MatMul", [x, wt], name=name)
            return self.g.op("Add", [y, self.plain(name + ".bias", bias)], name=name + "/bias", outputs=outs)[0]
        act = self.calibration.get(name) if scheme.method != "rtn" else None
        q = quantize(w, scheme, importance=act and act.importance, gram=act and act.gram)
        self.record(name, w, q.scheme, q.max_rel_err, q.rms_rel_err, calibrated=act is not None)
        ins = [x, self.g.weight(name + ".qweight", q.packed), self.scales(name, q.scales, scheme)]
        ins.append(self.g.weight(name + ".zero_points", q.zero_points) if q.zero_points is not None else "")
        if bias is not None:
            ins += ["", self.plain(name + ".bias", bias)]
        return self.g.op("MatMulNBits", ins, name=name, outputs=outs, domain=MS, K=k, N=n, bits=scheme.bits,
                         block_size=scheme.block_size, accuracy_level=4)[0]

    def embedding(self, ids: str, w: np.ndarray, name: str, scheme: QuantScheme | None) -> str:
        if scheme is None or w.shape[1] % scheme.block_size:
            table = self.plain(name, w)
            if scheme is None and (at := self.g.offset_of(table)) is not None:
                self.tied = Tied(None, at, -1, tuple(w.shape))
            return self.g.op1("Gather", [table, ids], name=name, axis=0)
        q = quantize(w, scheme)
        self.record(name, w, scheme, q.max_rel_err, q.rms_rel_err)
        v = w.shape[0]
        data = q.packed.reshape(v, -1)                               # [V, H * bits / 8]
        ins = [self.g.weight(name + ".qweight", data), ids, self.scales(name, q.scales, scheme)]
        if q.zero_points is not None:
            ins.append(self.g.weight(name + ".zero_points", q.zero_points))
        elif None not in (at := (self.g.offset_of(ins[0]), self.g.offset_of(name + ".scales"))):
            self.tied = Tied(scheme, at[0], at[1], tuple(w.shape))
        return self.g.op1("GatherBlockQuantized", ins, name=name, domain=MS, gather_axis=0, quantize_axis=1,
                          block_size=scheme.block_size, bits=scheme.bits)


def _rms(g: Graph, x: str, w: str, eps: float, name: str) -> str:
    return g.op1("SimplifiedLayerNormalization", [x, w], name=name, axis=-1, epsilon=eps, stash_type=1)


def _skip_rms(g: Graph, x: str, residual: str, w: str, eps: float, name: str) -> tuple[str, str]:
    """(norm(x + residual), x + residual)."""
    out, total = f"{name}/out", f"{name}/sum"
    # outputs 1 and 2 (mean, inv_std_var) left unnamed: asking for them costs time
    g.op("SkipSimplifiedLayerNormalization", [x, residual, w], name=name, outputs=[out, "", "", total],
         domain=MS, epsilon=eps)
    return out, total


@dataclass(frozen=True)
class StepInputs:
    """Graph inputs every layer of one forward step reads."""
    seqlens_k: str
    total: str
    cos: str
    sin: str


def step_inputs(g: Graph, arch: DecoderArch, max_context: int) -> StepInputs:
    seqlens_k = g.input("seqlens_k", TensorProto.INT32, [1])
    total = g.input("total_sequence_length", TensorProto.INT32, [])
    cos, sin = tables(arch.rope_dim, arch.spec.rope_theta, arch.rope_scaling, max_context)
    return StepInputs(seqlens_k, total, g.weight("rope.cos", cos), g.weight("rope.sin", sin))


def swiglu_mlp(g: Graph, em: _Emitter, x: str, gate: np.ndarray, up: np.ndarray, down: np.ndarray, prefix: str,
               schemes: tuple[QuantScheme | None, QuantScheme | None], biases=(None, None, None), *,
               out: str | None = None) -> str:
    """down(silu(gate(x)) * up(x)); gate|up fused into one matmul of 2F rows. schemes: (gate|up, down)."""
    bgu = np.concatenate([biases[0], biases[1]]) if biases[0] is not None else None
    gu = em.linear(x, np.concatenate([gate, up], axis=0), prefix + "gate_up", schemes[0], bgu)
    g_, u_ = g.op("Split", [gu], 2, name=prefix + "gate_up_split", axis=-1, num_outputs=2)
    act = g.op1("QuickGelu", [g_], name=prefix + "silu", domain=MS, alpha=1.0)     # x * sigmoid(x)
    return em.linear(g.op1("Mul", [act, u_], name=prefix + "swiglu"), down, prefix + "down", schemes[1], biases[2], out=out)


def lm_head(g: Graph, em: _Emitter, arch: DecoderArch, get: Callable[[str], np.ndarray], h: str, residual: str,
            scheme: QuantScheme | None, tied: Tied | None = None) -> str:
    """final norm -> Gather(logits_positions) -> lm_head: declares logits_positions and logits. With tied
    embeddings quantized like the lm_head, it reads the embedding's bytes (stored once)."""
    s = arch.spec
    positions = g.input("logits_positions", TensorProto.INT64, ["P"])
    x, _ = _skip_rms(g, h, residual, em.plain("final_norm", get(arch.top["final_norm"])), s.norm_eps, "final_norm")
    x = g.op1("Gather", [x, positions], name="logits_positions", axis=1)              # [1, P, H]
    if s.tie_word_embeddings and tied is not None and scheme is not None and tied.scheme == scheme:
        (v, k), bs = tied.shape, scheme.block_size
        qw = g.shared_weight("lm_head.qweight", np.uint8, (v, k // bs, bs * scheme.bits // 8), tied.qweight_offset)
        stored = np.dtype(em.scale_dtype(scheme))                     # as the embedding wrote them
        sc = em.as_fp32("lm_head", g.shared_weight("lm_head.scales", stored, (v, k // bs), tied.scales_offset), scheme)
        g.op("MatMulNBits", [x, qw, sc], name="lm_head", outputs=["logits"], domain=MS, K=k, N=v,
             bits=scheme.bits, block_size=bs, accuracy_level=4)
    elif s.tie_word_embeddings and tied is not None and tied.scheme is None and scheme is None:
        table = g.shared_weight("lm_head.embed", np.float32, tied.shape, tied.qweight_offset)   # [V, H], stored once
        g.op("MatMul", [x, g.op1("Transpose", [table], name="lm_head/transpose", perm=[1, 0])], name="lm_head",
             outputs=["logits"])
    else:
        head = get(arch.top.get("lm_head", arch.top["embed"]))
        em.linear(x, head, "lm_head", scheme, out="logits")
        if s.tie_word_embeddings:
            em.num_parameters -= head.size          # one tensor, counted once
    g.output("logits", TensorProto.FLOAT, [1, "P", s.vocab_size])
    return positions


def build_decoder(g: Graph, arch: DecoderArch, get: Callable[[str], np.ndarray], policy: QuantPolicy, *,
                  max_context: int, calibration: Mapping[str, Activations] | None = None,
                  progress: Callable[[str], None] = lambda s: None
                  ) -> tuple[GraphSpec, list[TensorEntry], int]:
    """Emit the whole dense decoder into `g`; returns the graph spec, tensor entries, parameter count."""
    s: ModelSpec = arch.spec
    em = _Emitter(g, calibration=calibration)
    ids = g.input("input_ids", TensorProto.INT64, [1, "S"])
    step = step_inputs(g, arch, max_context)
    h = em.embedding(ids, get(arch.top["embed"]), "embed", policy.embed)
    residual = None
    kvs = []
    for i in range(s.num_layers):
        progress(f"layer {i + 1}/{s.num_layers}")
        n = arch.layer_names(i)
        x, residual, cache = arch.attention(g, em, arch, get, i, h, residual, step, policy)
        kvs += cache
        b = lambda role: get(n[role + "_bias"]) if role + "_bias" in n else None
        h = swiglu_mlp(g, em, x, get(n["gate"]), get(n["up"]), get(n["down"]), f"layers.{i}.", (policy.mlp, policy.mlp_down),
                       (b("gate"), b("up"), b("down")))
    positions = lm_head(g, em, arch, get, h, residual, policy.lm_head, em.tied)
    spec = GraphSpec(file="model.onnx", input_ids=ids, seqlens_k=step.seqlens_k, total_sequence_length=step.total,
                     logits_positions=positions, logits="logits", cache=tuple(kvs), data=(g.data.path.name,))
    return spec, em.entries, em.num_parameters
