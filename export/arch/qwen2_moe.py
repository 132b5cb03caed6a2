"""Qwen1.5-MoE / Qwen2-MoE: Qwen2 attention (q/k/v bias) and a sparse MLP (softmax router, top-k,
renormalised only when norm_topk_prob) plus a shared expert that every token uses, scaled by
sigmoid(shared_expert_gate(x)); layers in mlp_only_layers or off decoder_sparse_step are dense."""
from __future__ import annotations

import dataclasses

from . import qwen2
from .common import DecoderArch, sparse_moe


def describe(cfg: dict) -> DecoderArch:
    arch = sparse_moe(qwen2.describe(cfg), cfg, ffn_key="moe_intermediate_size",
                      normalize=bool(cfg.get("norm_topk_prob", False)))

    def shared(i: int) -> dict[str, str]:
        p = f"model.layers.{i}.mlp.shared_expert"
        return {"gate": f"{p}.gate_proj.weight", "up": f"{p}.up_proj.weight", "down": f"{p}.down_proj.weight",
                "gate_weight": f"{p}_gate.weight"}
    return dataclasses.replace(arch, moe=dataclasses.replace(arch.moe, shared_expert=shared))
