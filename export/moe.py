"""Build a Mixture-of-Experts bundle: one graph per layer (attention + router), a head graph,
one expert graph, and the expert store.

    stage i (layers.i.onnx)                                        runtime, between stages
    hidden, residual ─► SkipRMSNorm ─► attention (KV in place)     route: softmax(router_logits)
        ─► SkipRMSNorm ─► moe_in ─┬──────────────────────────────►  top-k (renormalised if asked)
                                  └► MatMul(router) ─► router_logits  hidden' = Σ w_k · expert_k(moe_in)
    head (head.onnx): SkipRMSNorm(hidden + residual) ─► Gather(logits_positions) ─► lm_head ─► logits
    expert (expert.onnx): x ─► Linear gate|up ─► Split ─► SiLU·up ─► Linear down ─► y

Every expert's weights are one contiguous, 4 KiB aligned blob in experts.bin, laid out exactly as
the expert graph's initializers (whose external data points at expert (0, 0)); the runtime builds
an expert's session by handing it its blob's tensors (SessionOptions.add_initializer).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
from onnx import TensorProto

from edge.errors import UnsupportedError
from edge.manifest import ExpertEntry, ExpertTensor, GraphSpec, MoESpec, StageSpec, TensorEntry

from .arch.common import DecoderArch
from .decoder import QuantPolicy, StepInputs, _Emitter, attention, lm_head, swiglu_mlp
from .onnx_graph import ALIGN, DataFile, Graph
from .rope import tables


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


def _expert_graph(blob: _Blob, gate, up, down, hidden: int, scheme, prefix: str):
    """The expert graph (x [T, H] -> y [T, H]) with this expert's weights in `blob`."""
    g = Graph(blob, inline_below=0)
    em = _Emitter(g)
    x = g.input("x", TensorProto.FLOAT, ["T", hidden])
    swiglu_mlp(g, em, x, gate, up, down, prefix, scheme, out="y")
    g.output("y", TensorProto.FLOAT, ["T", hidden])
    return g, em


def build_moe(root: Path, arch: DecoderArch, get: Callable[[str], np.ndarray], policy: QuantPolicy, *,
              max_context: int, progress: Callable[[str], None] = lambda s: None
              ) -> tuple[GraphSpec, MoESpec, list[TensorEntry], int, list[str]]:
    """Write stages, expert graph and expert store into `root`; returns the graph spec (KV cache),
    the MoE spec, tensor entries, parameter count and the files written."""
    s, moe = arch.spec, arch.moe
    data = DataFile(root / "stages.onnx.data")
    cos, sin = tables(s.head_dim, s.rope_theta, arch.rope_scaling, max_context)
    cos_at, sin_at = data.write(cos.tobytes()), data.write(sin.tobytes())
    entries: list[TensorEntry] = []
    n_params = 0
    stages: list[StageSpec] = []
    kvs = []
    files = ["stages.onnx.data"]
    store = open(root / "experts.bin", "wb")
    experts: list[ExpertEntry] = []
    layout: tuple[ExpertTensor, ...] | None = None
    for i in range(s.num_layers):
        progress(f"layer {i + 1}/{s.num_layers}")
        if i not in moe.sparse_layers:
            raise UnsupportedError(f"layer {i} of this {s.architecture} model has a dense MLP; "
                                   "mixing dense and sparse layers is not supported yet")
        g = Graph(data)
        em = _Emitter(g)
        step = StepInputs(g.input("seqlens_k", TensorProto.INT32, [1]),
                          g.input("total_sequence_length", TensorProto.INT32, []),
                          g.shared_weight("rope.cos", np.float32, cos.shape, cos_at),
                          g.shared_weight("rope.sin", np.float32, sin.shape, sin_at))
        ins = {"seqlens_k": step.seqlens_k, "total_sequence_length": step.total}
        if i == 0:
            ins["input_ids"] = g.input("input_ids", TensorProto.INT64, [1, "S"])
            h = em.embedding(ins["input_ids"], get(arch.top["embed"]), "embed", policy.embed)
            residual = None
        else:
            h = ins["hidden"] = g.input("hidden", TensorProto.FLOAT, [1, "S", s.hidden_size])
            residual = ins["residual"] = g.input("residual", TensorProto.FLOAT, [1, "S", s.hidden_size])
        x, res, kv = attention(g, em, arch, get, i, h, residual, step, policy.linear)
        kvs.append(kv)
        ins.update(past_key=kv[0], past_value=kv[1])
        for name, src in (("moe_in", x), ("residual_out", res)):
            g.nodes.append(_identity(src, name))
            g.output(name, TensorProto.FLOAT, [1, "S", s.hidden_size])
        router = get(moe.router_name(i))                                        # [E, H]
        em.linear(x, router, f"layers.{i}.router", None, out="router_logits")  # fp32: routing decides everything
        g.output("router_logits", TensorProto.FLOAT, [1, "S", moe.num_experts])
        outs = {"moe_in": "moe_in", "residual": "residual_out", "router_logits": "router_logits",
                "present_key": kv[2], "present_value": kv[3]}
        g.save(root / f"layers.{i}.onnx", name=f"layer_{i}")
        files.append(f"layers.{i}.onnx")
        stages.append(StageSpec(file=f"layers.{i}.onnx", inputs=ins, outputs=outs))
        entries += em.entries
        n_params += em.num_parameters

        for e, gate, up, down in moe.experts(get, i):
            blob = _Blob("experts.bin")
            eg, eem = _expert_graph(blob, gate, up, down, s.hidden_size, policy.linear, "expert.")
            these = tuple(ExpertTensor(name=t.name, dtype=_np_dtype(t.data_type), shape=tuple(t.dims),
                                       offset=int({k.key: k.value for k in t.external_data}["offset"]))
                          for t in eg.initializers)
            if layout is None:
                layout = these
                eg.save(root / "expert.onnx", name="expert")   # its external data is expert (0, 0) at offset 0
                files.append("expert.onnx")
            elif these != layout:
                raise AssertionError(f"expert {i}.{e} has a different tensor layout")
            raw = blob.bytes()
            store.write(b"\0" * (-store.tell() % ALIGN))
            experts.append(ExpertEntry(layer=i, expert=e, offset=store.tell(), size=len(raw),
                                       sha256=hashlib.sha256(raw).hexdigest()))
            store.write(raw)
            entries += [dataclasses.replace(t, name=t.name.replace("expert.", f"layers.{i}.experts.{e}.", 1))
                        for t in eem.entries]
            n_params += eem.num_parameters

    # head
    g = Graph(data)
    em = _Emitter(g)
    h = g.input("hidden", TensorProto.FLOAT, [1, "S", s.hidden_size])
    residual = g.input("residual", TensorProto.FLOAT, [1, "S", s.hidden_size])
    positions, _ = lm_head(g, em, arch, get, h, residual, policy.lm_head)
    g.save(root / "head.onnx", name="head")
    files.append("head.onnx")
    stages.append(StageSpec(file="head.onnx", inputs={"hidden": h, "residual": residual, "logits_positions": positions},
                            outputs={"logits": "logits"}))
    entries += em.entries
    n_params += em.num_parameters
    store.close()
    data.close()
    files.append("experts.bin")

    spec = GraphSpec(file=stages[0].file, input_ids="input_ids", seqlens_k="seqlens_k",
                     total_sequence_length="total_sequence_length", logits_positions=positions, logits="logits",
                     kv_num_heads=s.num_kv_heads, kv_head_dim=s.head_dim, kv_dtype="float32",
                     past_keys=tuple(k[0] for k in kvs), past_values=tuple(k[1] for k in kvs),
                     present_keys=tuple(k[2] for k in kvs), present_values=tuple(k[3] for k in kvs))
    moe_spec = MoESpec(stages=tuple(stages), expert_graph="expert.onnx", expert_input="x", expert_output="y",
                       expert_file="experts.bin", expert_tensors=layout, experts=tuple(experts),
                       num_experts=moe.num_experts, top_k=moe.top_k, normalize_topk=moe.normalize_topk)
    return spec, moe_spec, entries, n_params, files


def _identity(src: str, dst: str):
    from onnx import helper
    return helper.make_node("Identity", [src], [dst], name=f"{dst}/identity")


def _np_dtype(onnx_type: int) -> str:
    return {TensorProto.FLOAT: "float32", TensorProto.UINT8: "uint8"}[onnx_type]
