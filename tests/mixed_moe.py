#!/usr/bin/env python3
"""A real MoE checkpoint with dense layers among the sparse ones: SmolMoE-8x135M rewritten as
Qwen2-MoE with `mlp_only_layers` = every third layer, whose MLP is SmolLM2-135M's own dense FFN
(SmolMoE's experts are that FFN plus a rank-16 delta, so the hybrid stays a working model).
The q/k/v biases and each shared expert's down_proj are zero, so a sparse layer computes exactly
what SmolMoE's computes. Weights written as fp32.

    python tests/mixed_moe.py SMOLMOE_HF_DIR SMOLLM2_HF_DIR OUT_DIR
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

SHARED_EXPERT = 32          # rows of the (zero-output) shared expert Qwen2-MoE requires


def make(smolmoe: Path, smollm2: Path, out: Path, *, dense_every: int = 3) -> Path:
    from safetensors.numpy import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from export.sources import open_source
    moe, dense = open_source(str(smolmoe)), open_source(str(smollm2))
    cfg = json.loads((Path(smolmoe) / "config.json").read_text())
    L, H, F, E = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    dense_layers = list(range(0, L, dense_every))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dict(
        model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], vocab_size=cfg["vocab_size"], hidden_size=H,
        intermediate_size=F, moe_intermediate_size=F, shared_expert_intermediate_size=SHARED_EXPERT, num_hidden_layers=L,
        num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg["num_key_value_heads"],
        max_position_embeddings=cfg["max_position_embeddings"], rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=cfg["rope_theta"], tie_word_embeddings=True, num_experts=E, num_experts_per_tok=cfg["num_experts_per_tok"],
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=dense_layers, use_sliding_window=False,
        hidden_act="silu", bos_token_id=cfg["bos_token_id"], eos_token_id=cfg["eos_token_id"], torch_dtype="float32"), indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (Path(smolmoe) / f).is_file():
            shutil.copy(Path(smolmoe) / f, out / f)
    rng = np.random.default_rng(0)
    index: dict[str, str] = {}
    shard = {k: moe.get(k) for k in ("model.embed_tokens.weight", "model.norm.weight")}

    def flush() -> None:
        name = f"model-{len(set(index.values())):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        index.update({k: name for k in shard})
        shard.clear()

    for i in range(L):
        p = f"model.layers.{i}."
        for k in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                  "self_attn.v_proj", "self_attn.o_proj"):
            shard[f"{p}{k}.weight"] = moe.get(f"{p}{k}.weight")
        for r in "qkv":
            shard[f"{p}self_attn.{r}_proj.bias"] = np.zeros(shard[f"{p}self_attn.{r}_proj.weight"].shape[0], np.float32)
        if i in dense_layers:
            for r in ("gate", "up", "down"):
                shard[f"{p}mlp.{r}_proj.weight"] = dense.get(f"{p}mlp.{r}_proj.weight")
        else:
            shard[p + "mlp.gate.weight"] = moe.get(p + "block_sparse_moe.gate.weight")
            for e in range(E):
                for ours, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                    shard[f"{p}mlp.experts.{e}.{ours}.weight"] = moe.get(f"{p}block_sparse_moe.experts.{e}.{theirs}.weight")
            s = p + "mlp.shared_expert."
            for r in ("gate_proj", "up_proj"):
                shard[s + r + ".weight"] = (0.02 * rng.standard_normal((SHARED_EXPERT, H))).astype(np.float32)
            shard[s + "down_proj.weight"] = np.zeros((H, SHARED_EXPERT), np.float32)
            shard[p + "mlp.shared_expert_gate.weight"] = (0.02 * rng.standard_normal((1, H))).astype(np.float32)
        if sum(a.nbytes for a in shard.values()) > 1 << 30:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    print(make(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
