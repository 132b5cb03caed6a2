"""Build a Mixture-of-Experts bundle: one graph per layer (attention + router), a head graph,
one expert graph, and the expert store.

    stage i (layers.i.onnx)                                        runtime, between stages
    hidden, residual ─► SkipRMSNorm ─► attention (KV in place)     route: softmax(router_logits)
        ─► SkipRMSNorm ─► moe_in ─┬──────────────────────────────►  top-k (renormalised if asked)
                                  └► MatMul(router) ─► router_logits  hidden' = Σ w_k · expert_k(moe_in)
    a dense layer's stage (Qwen-MoE's mlp_only_layers, decoder_sparse_step): its MLP inside,
        hidden, residual ─► ... ─► SkipRMSNorm ─► SwiGLU MLP ─► hidden_out (nothing for the runtime to do)
    head (head.onnx): SkipRMSNorm(hidden + residual) ─► Gather(logits_positions) ─► lm_head ─► logits
    expert (expert.onnx): x ─► Linear gate|up ─► Split ─► SiLU·up ─► Linear down ─► y
        or, where QMoE can run the experts, x ─► one-expert QMoE ─► y: the fused graph's own
        kernel, so the staged pipeline computes what the fused graph computes, bit for bit

Experts are numbered by MoE layer (the n-th stage with a router), not by decoder layer.
Every expert's weights are one contiguous, 4 KiB aligned blob in experts.bin, laid out exactly as
the expert graph's initializers (whose external data points at expert (0, 0)); the runtime builds
an expert's session by handing it its blob's tensors (SessionOptions.add_initializer).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np
from onnx import TensorProto

from edge.manifest import ExpertEntry, ExpertTensor, GraphSpec, MoESpec, StageSpec, TensorEntry

from .arch.common import DecoderArch
from .decoder import QuantPolicy, StepInputs, _Emitter, lm_head, swiglu_mlp
from .onnx_graph import ALIGN, DataFile, Graph, external_tensor
from .rope import tables

if TYPE_CHECKING:
    from .calib import Activations


class _Blob:
    """Collects one expert's tensors as a contiguous blob (stands in for a DataFile)."""

    def __init__(self, location: str):
        self.path = Path(location)
        self.parts: list[bytes] = []
        self.size = 0

    def write(self, raw: bytes) -> int:
        pad = -self.size % 64
        self.parts.append(b"\0" * pad)
        offset = self.size + pad
        self.parts.append(raw)
        self.size = offset + len(raw)
        return offset

    def bytes(self) -> bytes:
        return b"".join(self.parts)


def _expert_graph(blob: _Blob, gate, up, down, hidden: int, schemes, prefix: str,
                  calibration: Mapping[str, Activations]):
    """The expert graph (x [T, H] -> y [T, H]) with this expert's weights in `blob`."""
    g = Graph(blob, inline_below=0)
    em = _Emitter(g, half_scales=False, calibration=calibration)   # fp32 in the graph; _store halves them
    x = g.input("x", TensorProto.FLOAT, ["T", hidden])
    swiglu_mlp(g, em, x, gate, up, down, prefix, schemes, out="y")
    g.output("y", TensorProto.FLOAT, ["T", hidden])
    return g, em


def _qmoe_expert(t: Mapping[str, np.ndarray], hidden: int, scheme) -> tuple[Graph, _Blob]:
    """The expert as a one-expert QMoE node (the kernel of the fused graph's QMoE, whose routing
    weight is then exactly 1), its weights as QMoE takes them in a new blob:

        x [T, H] ─► Shape[0:1] ─► Concat(·, Constant [1]) ─► ConstantOfShape ─► router logits: zeros [T, 1]
        x, zeros, fc1 (gate|up rows interleaved g0, u0, g1, u1, ...), fc2 ─► QMoE(k=1) ─► y [T, H]

    `t`: the MatMulNBits expert graph's tensors, by name (_expert_graph)."""
    blob = _Blob("experts.bin")
    g = Graph(blob, inline_below=0)
    x = g.input("x", TensorProto.FLOAT, ["T", hidden])
    qw, sc = t["expert.gate_up.qweight"], t["expert.gate_up.scales"]                 # [2F, n, b], [2F, n]
    ffn = qw.shape[0] // 2
    order = np.arange(2 * ffn).reshape(2, ffn).T.reshape(-1)                          # [g0, u0, g1, u1, ...]
    w = {"expert.gate_up.qweight": qw[order].reshape(1, 2 * ffn, -1),                 # [1, 2F, H * bits / 8]
         "expert.gate_up.scales": sc[order].reshape(1, 2 * ffn, -1),                  # [1, 2F, H / block]
         "expert.down.qweight": t["expert.down.qweight"].reshape(1, hidden, -1),      # [1, H, F * bits / 8]
         "expert.down.scales": t["expert.down.scales"].reshape(1, hidden, -1)}        # [1, H, F / block]
    names = [g.weight(k, v) for k, v in w.items()]
    rows = g.op1("Shape", [x], name="rows", start=0, end=1)                                    # [1] = T
    one = g.op1("Constant", [], name="one", value_ints=[1])
    shape = g.op1("Concat", [rows, one], name="router_shape", axis=0)                          # [2] = T, 1
    zeros = g.op1("ConstantOfShape", [shape], name="router_logits")                            # [T, 1]
    g.op("QMoE", [x, zeros, names[0], names[1], "", names[2], names[3]], name="qmoe", outputs=["y"],
         domain="com.microsoft", **qmoe_attributes(1, scheme))
    g.output("y", TensorProto.FLOAT, ["T", hidden])
    return g, blob


def qmoe_attributes(k: int, scheme) -> dict:
    """One set of QMoE attributes for the expert graph and the fused graph: the same kernel."""
    return dict(k=k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
                expert_weight_bits=scheme.bits, block_size=scheme.block_size, accuracy_level=4)


def _tensors(g: Graph, raw: bytes) -> dict[str, np.ndarray]:
    """The graph's initializers as arrays over `raw` (its blob's bytes), by name."""
    return {x.name: np.frombuffer(raw, x.dtype, int(np.prod(x.shape)), x.offset).reshape(x.shape)
            for x in _layout(g)}


def _layout(g: Graph) -> tuple[ExpertTensor, ...]:
    return tuple(ExpertTensor(name=t.name, dtype=_np_dtype(t.data_type), shape=tuple(t.dims),
                              offset=int({k.key: k.value for k in t.external_data}["offset"]))
                 for t in g.initializers)


def _store(raw: bytes, tensors: tuple[ExpertTensor, ...], half: set[str]) -> tuple[bytes, tuple[ExpertTensor, ...]]:
    """An expert's blob as stored: its tensors in graph order, 64-byte aligned, the fp32 scales named
    in `half` as fp16 (their values are fp16-exact; the runtime widens them: ExpertTensor.load_as)."""
    out = _Blob("experts.bin")
    layout = []
    for t in tensors:
        a = np.frombuffer(raw, t.dtype, int(np.prod(t.shape)), t.offset)
        if t.name in half:
            layout.append(dataclasses.replace(t, dtype="float16", offset=out.write(a.astype(np.float16).tobytes()),
                                              load_as=t.dtype))
        else:
            layout.append(dataclasses.replace(t, offset=out.write(a.tobytes())))
    return out.bytes(), tuple(layout)


def build_moe(root: Path, arch: DecoderArch, get: Callable[[str], np.ndarray], policy: QuantPolicy, *,
              max_context: int, calibration: Mapping[str, Activations] | None = None,
              progress: Callable[[str], None] = lambda s: None
              ) -> tuple[GraphSpec, MoESpec, list[TensorEntry], int, list[str]]:
    """Write stages, expert graph and expert store into `root`; returns the graph spec (KV cache),
    the MoE spec, tensor entries, parameter count and the files written. `calibration` is keyed by
    manifest tensor name (export/calib.py)."""
    calibration = {} if calibration is None else calibration      # streamed (export/calib.py): no len()
    s, moe = arch.spec, arch.moe
    data = DataFile(root / "stages.onnx.data")
    cos, sin = tables(arch.rope_dim, s.rope_theta, arch.rope_scaling, max_context)
    cos_at, sin_at = data.write(cos.tobytes()), data.write(sin.tobytes())
    entries: list[TensorEntry] = []
    n_params = 0
    stages: list[StageSpec] = []
    kvs = []
    files = ["stages.onnx.data"]
    store = open(root / "experts.bin", "wb")
    experts: list[ExpertEntry] = []
    layout: tuple[ExpertTensor, ...] | None = None
    scheme = policy.experts
    # QMoE: quantized, no zero points, one scheme for both matmuls, block size dividing both depths
    qmoe = (scheme is not None and scheme == policy.experts_down and scheme.symmetric
            and s.hidden_size % scheme.block_size == 0 and moe.expert_intermediate_size % scheme.block_size == 0)
    # the fused graph also needs a routing its QMoE nodes express: softmax top-k (renormalised, or scaled back
    # by the top-k probability mass); sigmoid scores, groups, biases and scales are routed by the runtime
    r = moe.routing
    fusable = qmoe and r.scoring == "softmax" and r.groups == 1 and not r.bias and r.scale == 1.0
    # the expert store keeps these scales as fp16 (the expert graph and QMoE take fp32)
    half = {f"expert.{n}.scales" for n, sc in (("gate_up", policy.experts), ("down", policy.experts_down))
            if sc is not None and sc.scale_dtype == "float16"}
    stage_graphs: list[Graph] = []
    tied = None                                  # the quantized embedding, for a tied lm_head
    routers: list[int | None] = []
    biases: list[int] = []                       # routing correction biases, fp32 [E] each, in stages.onnx.data
    moe_layers: dict[int, int] = {}              # decoder layer -> MoE layer (the experts' numbering)
    for i in range(s.num_layers):
        progress(f"layer {i + 1}/{s.num_layers}")
        g = Graph(data)
        em = _Emitter(g, calibration=calibration)
        step = StepInputs(g.input("seqlens_k", TensorProto.INT32, [1]),
                          g.input("total_sequence_length", TensorProto.INT32, []),
                          g.shared_weight("rope.cos", np.float32, cos.shape, cos_at),
                          g.shared_weight("rope.sin", np.float32, sin.shape, sin_at))
        ins = {"seqlens_k": step.seqlens_k, "total_sequence_length": step.total}
        if i == 0:
            ins["input_ids"] = g.input("input_ids", TensorProto.INT64, [1, "S"])
            h = em.embedding(ins["input_ids"], get(arch.top["embed"]), "embed", policy.embed)
            tied = em.tied
            residual = None
        else:
            h = ins["hidden"] = g.input("hidden", TensorProto.FLOAT, [1, "S", s.hidden_size])
            residual = ins["residual"] = g.input("residual", TensorProto.FLOAT, [1, "S", s.hidden_size])
        x, res, cache = arch.attention(g, em, arch, get, i, h, residual, step, policy)
        mine = tuple(range(len(kvs), len(kvs) + len(cache)))
        kvs += cache
        g.nodes.append(_identity(res, "residual_out"))
        g.output("residual_out", TensorProto.FLOAT, [1, "S", s.hidden_size])
        outs = {"residual": "residual_out"}
        if i in moe.sparse_layers:
            moe_layers[i] = len(routers)         # experts are numbered by MoE layer: this is the n-th
            g.nodes.append(_identity(x, "moe_in"))
            g.output("moe_in", TensorProto.FLOAT, [1, "S", s.hidden_size])
            router = moe.router(get, i)                                             # [E, H]
            em.linear(x, router, f"layers.{i}.router", None, out="router_logits")  # fp32: routing decides everything
            routers.append(g.offset_of(f"layers.{i}.router"))                      # None when stored inline
            if r.bias:
                biases.append(data.write(np.ascontiguousarray(moe.router_bias(get, i), np.float32).tobytes()))
            g.output("router_logits", TensorProto.FLOAT, [1, "S", moe.num_experts])
            outs.update(moe_in="moe_in", router_logits="router_logits")
            if moe.shared_expert:      # shared_mlp(x) [x sigmoid(x @ gate_weight.T)], added to the routed sum
                n = moe.shared_expert(i)
                gated = "gate_weight" in n
                y = swiglu_mlp(g, em, x, get(n["gate"]), get(n["up"]), get(n["down"]), f"layers.{i}.shared.",
                               (policy.mlp, policy.mlp_down), out=None if gated else "moe_shared")
                if gated:
                    gate = g.op1("Sigmoid", [em.linear(x, get(n["gate_weight"]), f"layers.{i}.shared_gate", None)],
                                 name=f"layers.{i}.shared_gate/sigmoid")                               # [1, S, 1]
                    g.op("Mul", [y, gate], name=f"layers.{i}.shared/scale", outputs=["moe_shared"])
                g.output("moe_shared", TensorProto.FLOAT, [1, "S", s.hidden_size])
                outs["moe_shared"] = "moe_shared"
        else:                                    # a dense layer: its MLP in the stage, no experts
            n = arch.layer_names(i)
            bias = tuple(get(n[r + "_bias"]) if r + "_bias" in n else None for r in ("gate", "up", "down"))
            swiglu_mlp(g, em, x, get(n["gate"]), get(n["up"]), get(n["down"]), f"layers.{i}.",
                       (policy.mlp, policy.mlp_down), bias, out="hidden_out")
            g.output("hidden_out", TensorProto.FLOAT, [1, "S", s.hidden_size])
            outs["hidden"] = "hidden_out"
        g.save(root / f"layers.{i}.onnx", name=f"layer_{i}")
        files.append(f"layers.{i}.onnx")
        stages.append(StageSpec(file=f"layers.{i}.onnx", inputs=ins, outputs=outs, cache=mine))
        entries += em.entries
        n_params += em.num_parameters
        stage_graphs.append(g)
        if i not in moe_layers:
            continue
        for e, gate, up, down in moe.experts(get, i):
            blob = _Blob("experts.bin")
            mine = f"layers.{i}.experts.{e}."
            mine_cal = {"expert." + r: calibration.get(mine + r) for r in ("gate_up", "down")}
            eg, eem = _expert_graph(blob, gate, up, down, s.hidden_size, (policy.experts, policy.experts_down),
                                    "expert.", {k: v for k, v in mine_cal.items() if v is not None})
            raw = blob.bytes()
            if qmoe:
                eg, blob = _qmoe_expert(_tensors(eg, raw), s.hidden_size, scheme)
                raw = blob.bytes()
            graph_layout = _layout(eg)
            stored, these = _store(raw, graph_layout, half)
            if layout is None:
                layout = these
                # its external data points at expert (0, 0) with fp32 scales: placeholders only, every
                # session gets its expert's tensors through add_initializer
                eg.save(root / "expert.onnx", name="expert")
                files.append("expert.onnx")
            elif these != layout:
                raise AssertionError(f"expert {i}.{e} has a different tensor layout")
            store.write(b"\0" * (-store.tell() % ALIGN))
            experts.append(ExpertEntry(layer=moe_layers[i], expert=e, offset=store.tell(), size=len(stored),
                                       sha256=hashlib.sha256(stored).hexdigest()))
            store.write(stored)
            entries += [dataclasses.replace(t, name=t.name.replace("expert.", f"layers.{i}.experts.{e}.", 1),
                                            scale_dtype="float16" if t.name + ".scales" in half else t.scale_dtype)
                        for t in eem.entries]
            n_params += eem.num_parameters

    # head
    g = Graph(data)
    em = _Emitter(g, calibration=calibration)
    h = g.input("hidden", TensorProto.FLOAT, [1, "S", s.hidden_size])
    residual = g.input("residual", TensorProto.FLOAT, [1, "S", s.hidden_size])
    positions = lm_head(g, em, arch, get, h, residual, policy.lm_head, tied)
    g.save(root / "head.onnx", name="head")
    files.append("head.onnx")
    stages.append(StageSpec(file="head.onnx", inputs={"hidden": h, "residual": residual, "logits_positions": positions},
                            outputs={"logits": "logits"}))
    entries += em.entries
    n_params += em.num_parameters
    store.close()
    data.close()
    files.append("experts.bin")
    if fusable:
        _fused_graph(root, stage_graphs, g, moe_layers, experts, layout, arch, scheme)
        files.append("fused.onnx")

    spec = GraphSpec(file=stages[0].file, input_ids="input_ids", seqlens_k="seqlens_k",
                     total_sequence_length="total_sequence_length", logits_positions=positions, logits="logits",
                     cache=tuple(kvs), data=("stages.onnx.data",))
    moe_spec = MoESpec(stages=tuple(stages), expert_graph="expert.onnx", expert_input="x", expert_output="y",
                       expert_file="experts.bin", expert_tensors=layout, experts=tuple(experts),
                       num_experts=moe.num_experts, routing=moe.routing,
                       fused=dataclasses.replace(spec, file="fused.onnx", data=("stages.onnx.data", "experts.bin"))
                       if fusable else None,
                       router_file="stages.onnx.data" if None not in routers or biases else "",
                       routers=tuple(routers) if None not in routers else (), router_biases=tuple(biases))
    return spec, moe_spec, entries, n_params, files


def _fused_graph(root: Path, stage_graphs: list[Graph], head: Graph, moe_layers: dict[int, int],
                 experts: list[ExpertEntry], layout: tuple[ExpertTensor, ...], arch: DecoderArch, scheme) -> None:
    """All stages and the head merged into one graph, each MoE layer's experts as one QMoE node
    (onnxruntime routes and runs them itself). Its weights are the expert store's own bytes, no
    second copy: each QMoE input is the Concat of the layer's E per-expert tensors in experts.bin
    (Cast to fp32 where the store keeps fp16 scales), which onnxruntime folds into one constant at
    load, then prepacks:

        stage i's nodes ─► moe_in [1,S,H] ─► QMoE(Reshape(router_logits) [S,E], fc1, fc2) ─► [1,S,H] ─► stage i+1
        experts.bin: expert (i, 0..E-1) fc1 [1, 2F, H*bits/8] ─► Concat ─► fc1 [E, 2F, H*bits/8]  (and fc1 scales,
                     fc2, fc2 scales alike; scales: Concat fp16 [E, ...] ─► Cast fp32)
        (a dense layer's stage: its nodes ─► hidden_out ─► stage i+1)

    (QMoE takes the 3D hidden state as is; only the router logits need the 2D shape.)
    """
    from onnx import helper
    moe = arch.moe
    routing = moe.routing
    out = Graph(stage_graphs[0].data)
    seen: set[str] = set()

    def take(g: Graph, tag: str, rename: dict[str, str]) -> None:
        for n in g.nodes:
            m = helper.make_node(n.op_type, [rename.get(x, x) for x in n.input], [rename.get(x, x) for x in n.output],
                                 name=f"{tag}/{n.name}", domain=n.domain)
            m.attribute.extend(n.attribute)
            out.nodes.append(m)
        for t in g.initializers:
            if t.name not in seen:
                seen.add(t.name)
                out.initializers.append(t)
        for v in g.inputs:
            if v.name not in ("hidden", "residual") and v.name not in {x.name for x in out.inputs}:
                out.inputs.append(v)
        out.outputs.extend(v for v in g.outputs if v.name.startswith("present_") or v.name == "logits")

    flat_e = out.weight("moe.router_shape", np.array([-1, moe.num_experts], np.int64))
    for i, g in enumerate(stage_graphs):
        ren = {"moe_in": f"L{i}.moe_in", "residual_out": f"L{i}.residual", "router_logits": f"L{i}.router_logits",
               "moe_shared": f"L{i}.moe_shared", "hidden_out": f"L{i}.moe_out"}
        if i:
            ren.update(hidden=f"L{i - 1}.moe_out", residual=f"L{i - 1}.residual")
        take(g, f"L{i}", ren)
        if i not in moe_layers:               # a dense layer: its stage computed the MLP already
            continue
        mine = sorted((x for x in experts if x.layer == moe_layers[i]), key=lambda x: x.expert)
        w = {t.name: _stacked(out, f"layers.{i}.qmoe.{t.name.removeprefix('expert.')}", t, mine) for t in layout}
        fc1q, fc1s, fc2q, fc2s = (w[f"expert.{m}.{t}"] for m in ("gate_up", "down") for t in ("qweight", "scales"))
        r = out.op1("Reshape", [f"L{i}.router_logits", flat_e], name=f"L{i}/router_flat")           # [S, E]
        last = routing.normalize and not moe.shared_expert                # QMoE's output is the layer's
        # QMoE renormalises the top-k weights; without renormalisation (OLMoE, Qwen-MoE) the weights
        # are the plain softmax probabilities = renormalised weights x the top-k probability mass
        y = out.op("QMoE", [f"L{i}.moe_in", r, fc1q, fc1s, "", fc2q, fc2s], name=f"L{i}/qmoe",
                   outputs=[f"L{i}.moe_out"] if last else None, domain="com.microsoft",
                   **qmoe_attributes(moe.top_k, scheme))[0]                                          # [1, S, H]
        if not routing.normalize:
            probs = out.op1("Softmax", [r], name=f"L{i}/router_softmax", axis=-1)                  # [S, E]
            top = out.op("TopK", [probs, out.weight(f"L{i}.k", np.array([moe.top_k], np.int64))], 2,
                         name=f"L{i}/router_topk", axis=-1)[0]                                       # [S, k]
            mass = out.op1("ReduceSum", [top, out.weight(f"L{i}.axis", np.array([-1], np.int64))],
                           name=f"L{i}/topk_mass", keepdims=1)                                       # [S, 1]
            y = out.op("Mul", [y, mass], name=f"L{i}/unnormalise",                                 # [1, S, H]
                       outputs=None if moe.shared_expert else [f"L{i}.moe_out"])[0]
        if moe.shared_expert:
            out.nodes.append(helper.make_node("Add", [y, f"L{i}.moe_shared"], [f"L{i}.moe_out"], name=f"L{i}/moe_out"))
    last = len(stage_graphs) - 1
    take(head, "head", {"hidden": f"L{last}.moe_out", "residual": f"L{last}.residual"})
    out.save(root / "fused.onnx", name="fused_moe")


def _stacked(out: Graph, name: str, t: ExpertTensor, mine: list[ExpertEntry]) -> str:
    """One expert tensor of every expert in a layer as QMoE takes it: [E, ...] (t.shape is [1, ...])."""
    parts = []
    for x in mine:
        parts.append(f"{name}.{x.expert}")
        out.initializers.append(external_tensor(parts[-1], t.dtype, t.shape, "experts.bin", x.offset + t.offset))
    y = out.op1("Concat", parts, name=f"{name}/stack", axis=0)                              # [E, ...]
    return out.op1("Cast", [y], name=f"{name}/widen", to=TensorProto.FLOAT) if t.load_as else y


def _identity(src: str, dst: str):
    from onnx import helper
    return helper.make_node("Identity", [src], [dst], name=f"{dst}/identity")


def _np_dtype(onnx_type: int) -> str:
    return {TensorProto.FLOAT: "float32", TensorProto.UINT8: "uint8"}[onnx_type]
