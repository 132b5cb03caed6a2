"""Mixtral (and SmolMoE-8x135M): the Llama/Mistral attention with a sparse MLP in every layer.

Routing: softmax over the experts' router logits, top-k, renormalised to sum to 1.
Quirks fixed here: expert tensors come per expert (block_sparse_moe.experts.E.w1/w3/w2, the
layout transformers writes) or fused per layer (mlp.experts.gate_up_proj [E, 2F, H] with gate
rows first, mlp.experts.down_proj [E, H, F]); the router is block_sparse_moe.gate or mlp.gate."""
from __future__ import annotations

import dataclasses

from edge.errors import MissingTensorError

from .common import DecoderArch, MoEArch, llama_family, require, softmax_topk, stored_experts


def describe(cfg: dict) -> DecoderArch:
    arch = llama_family(cfg, attention_bias=False, sliding_window=int(cfg.get("sliding_window") or 0))
    n_exp, top_k = require(cfg, "num_local_experts"), require(cfg, "num_experts_per_tok")
    ffn = arch.spec.intermediate_size

    def router(get, i: int):
        try:
            return get(f"model.layers.{i}.block_sparse_moe.gate.weight")
        except MissingTensorError:                       # the fused layout's name
            return get(f"model.layers.{i}.mlp.gate.weight")

    def experts(get, i: int):
        p = f"model.layers.{i}.block_sparse_moe.experts."
        yield from stored_experts(get, i, n_exp, ffn, lambda e: (f"{p}{e}.w1.weight", f"{p}{e}.w3.weight",
                                                                 f"{p}{e}.w2.weight"))

    moe = MoEArch(num_experts=n_exp, expert_intermediate_size=ffn, routing=softmax_topk(top_k, True),
                  sparse_layers=tuple(range(arch.spec.num_layers)), router=router, experts=experts)
    spec = dataclasses.replace(arch.spec, num_experts=n_exp, experts_per_token=top_k, expert_intermediate_size=ffn)
    return dataclasses.replace(arch, spec=spec, moe=moe)
