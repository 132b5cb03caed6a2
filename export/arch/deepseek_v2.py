"""DeepSeek-V2 and V2-Lite (model_type "deepseek_v2"): multi-head latent attention, dense first
layers, routed experts beside ungated shared ones.

Routing: softmax over the experts; top-k among all of them ("greedy") or among the best `topk_group`
groups, each scored by its best expert ("group_limited_greedy"); weights x routed_scaling_factor,
not renormalised (as transformers computes it, which does not read norm_topk_prob for V2).
Quirks fixed here: rotary pairs are interleaved; experts per expert or fused per layer."""
from __future__ import annotations

from edge.manifest import Routing

from .common import DecoderArch, deepseek_family, reject, require


def describe(cfg: dict) -> DecoderArch:
    method = cfg.get("topk_method", "greedy")
    reject(cfg, "topk_method", ("greedy", "group_limited_greedy"))
    reject(cfg, "norm_topk_prob", (False,), " (transformers' DeepSeek-V2 does not renormalise, and edge follows it)")
    grouped = method == "group_limited_greedy"
    routing = Routing(scoring="softmax", top_k=require(cfg, "num_experts_per_tok"), normalize=False,
                      scale=float(cfg.get("routed_scaling_factor") or 1.0),
                      groups=int(cfg.get("n_group") or 1) if grouped else 1,
                      top_groups=int(cfg.get("topk_group") or 1) if grouped else 1, group_score="max")
    return deepseek_family({**cfg, "rope_interleave": True}, routing)
