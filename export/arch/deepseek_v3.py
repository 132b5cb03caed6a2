"""DeepSeek-V3, R1 and models built on them (Moonlight; model_type "deepseek_v3"): DeepSeek-V2's
layout with sigmoid routing.

Routing: sigmoid scores; a per-expert correction bias (e_score_correction_bias) is added for choosing
only; experts split into n_group groups, each scored by the sum of its two best, and top-k is taken
among the best topk_group groups; the chosen scores are renormalised if norm_topk_prob, then x
routed_scaling_factor ("noaux_tc"). Rotary pairs are interleaved unless rope_interleave is false.
FP8 checkpoints (e4m3 with 128x128 block scales) are read by the source (export/sources.py)."""
from __future__ import annotations

from edge.manifest import Routing

from .common import DecoderArch, deepseek_family, reject, require


def describe(cfg: dict) -> DecoderArch:
    reject(cfg, "topk_method", ("noaux_tc",))
    reject(cfg, "scoring_func", ("sigmoid",))
    routing = Routing(scoring="sigmoid", top_k=require(cfg, "num_experts_per_tok"),
                      normalize=bool(cfg.get("norm_topk_prob", True)),
                      scale=float(cfg.get("routed_scaling_factor") or 1.0), groups=int(cfg.get("n_group") or 1),
                      top_groups=int(cfg.get("topk_group") or 1), group_score="top2_sum", bias=True)
    return deepseek_family(cfg, routing)
