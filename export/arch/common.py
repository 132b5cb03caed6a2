"""What every decoder architecture module returns, and the Llama-family helpers they share."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from edge.errors import MissingTensorError, UnsupportedError
from edge.manifest import ModelSpec, Routing

from ..rope import rope_kind

LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class MoEArch:
    """The sparse MLP of a Mixture-of-Experts model.

    router(get, i): layer i's router weight [E, H].
    experts(get, i): yields (e, gate [F, H], up [F, H], down [H, F]) for every expert of layer i.
    sparse_layers: the layers whose MLP is sparse (the others use the dense names in layer_names).
    routing: how experts are chosen and weighed (edge/manifest.py Routing).
    router_bias(get, i): layer i's routing correction bias [E] (with routing.bias).
    shared_expert(i): names of layer i's shared expert: gate, up, down, and gate_weight [1, H] where
        its output is gated (sigmoid(x @ gate_weight.T), Qwen2-MoE); ungated without (DeepSeek).
    """
    num_experts: int
    expert_intermediate_size: int
    routing: Routing
    sparse_layers: tuple[int, ...]
    router: Callable[[Callable[[str], Any], int], Any]
    experts: Callable[[Callable[[str], Any], int], Any]
    shared_expert: Callable[[int], dict[str, str]] | None = None
    router_bias: Callable[[Callable[[str], Any], int], Any] | None = None

    @property
    def top_k(self) -> int:
        return self.routing.top_k


@dataclass(frozen=True)
class MLAShape:
    """Multi-head latent attention's sizes (export/attention.py mla)."""
    q_rank: int            # the q LoRA's rank (0: a plain q projection)
    kv_rank: int           # the compressed latent's size r (kv_lora_rank)
    nope_dim: int          # per head: query/key dims without rotary (qk_nope_head_dim)
    rope_dim: int          # rotary dims, shared key (qk_rope_head_dim)
    v_dim: int             # per head value dims (v_head_dim)
    scale: float           # the softmax scale (YaRN's mscale folded in)
    interleaved: bool      # rotary pairs (2j, 2j+1) as the checkpoint lays them out, else halves
    latent_eps: float = 1e-6   # the q_a / kv_a RMSNorms' epsilon: DeepSeek's code fixes it, whatever rms_norm_eps says


@dataclass(frozen=True)
class DecoderArch:
    """A decoder-only transformer as the exporter builds it.

    spec: the normalised description (num_parameters is filled in by the exporter).
    rope_scaling: the checkpoint's rope_scaling dict (or None).
    top: checkpoint names of "embed", "final_norm" and "lm_head" (absent when tied).
    layer_names(i): role -> checkpoint name; roles: input_norm, post_norm, q, k, v, o,
        gate, up, down, optional <linear>_bias, q_norm, k_norm.
    gguf_fixup(hf_name, array): undoes what llama.cpp's converter did to a tensor of this
        architecture (None: nothing to undo).
    attention: the layer's attention builder (export/attention.py: gqa or mla).
    rope_dim: the rotary dimensions the position tables cover.
    """
    spec: ModelSpec
    rope_scaling: dict | None
    top: dict[str, str]
    layer_names: Callable[[int], dict[str, str]]
    attention: Callable
    rope_dim: int
    gguf_fixup: Callable[[str, Any], Any] | None = field(default=None)
    moe: MoEArch | None = None
    mla: MLAShape | None = None


def require(cfg: dict, key: str):
    if key not in cfg:
        raise UnsupportedError(f"config.json of this {cfg.get('model_type')} checkpoint has no {key!r}")
    return cfg[key]


def reject(cfg: dict, key: str, allowed, why: str = "") -> None:
    """Refuse a config value that changes the computation in a way edge does not implement."""
    v = cfg.get(key)
    if v is not None and v not in allowed:
        raise UnsupportedError(f"config.json {key}={v!r} is not supported for {cfg.get('model_type')}"
                               f" (supported: {', '.join(map(repr, allowed))}){why}")


def rope_config(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either the classic rope_theta/rope_scaling keys or transformers 5's
    rope_parameters."""
    params = cfg.get("rope_parameters") or {}
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = cfg.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return theta, scaling


def llama_family(cfg: dict, *, attention_bias: bool, mlp_bias: bool = False, qk_norm: str = "",
                 o_bias: bool | None = None, sliding_window: int = 0) -> DecoderArch:
    """The Llama layout: RMSNorm, rotary GQA attention, SwiGLU MLP, HF tensor names."""
    reject(cfg, "hidden_act", ("silu",))
    theta, scaling = rope_config(cfg)
    hidden, heads = require(cfg, "hidden_size"), require(cfg, "num_attention_heads")
    head_dim = cfg.get("head_dim") or hidden // heads
    spec = ModelSpec(
        architecture=cfg["model_type"], vocab_size=require(cfg, "vocab_size"), hidden_size=hidden,
        num_layers=require(cfg, "num_hidden_layers"), num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
        intermediate_size=require(cfg, "intermediate_size"),
        max_context=cfg.get("max_position_embeddings") or 4096, rope_theta=theta,
        rope_scaling=rope_kind(scaling), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), attention_bias=attention_bias,
        qk_norm=qk_norm, sliding_window=sliding_window, num_parameters=0)   # qk_norm: "", "head" or "full"
    o_bias = attention_bias if o_bias is None else o_bias

    def layer_names(i: int) -> dict[str, str]:
        p = f"model.layers.{i}."
        names = {"input_norm": p + "input_layernorm.weight", "post_norm": p + "post_attention_layernorm.weight"}
        for r in ("q", "k", "v", "o"):
            names[r] = p + f"self_attn.{r}_proj.weight"
        for r in ("gate", "up", "down"):
            names[r] = p + f"mlp.{r}_proj.weight"
        biased = (["q", "k", "v"] if attention_bias else []) + (["o"] if o_bias else []) + \
                 (["gate", "up", "down"] if mlp_bias else [])
        for r in biased:
            names[r + "_bias"] = names[r][: -len("weight")] + "bias"
        if qk_norm:
            names["q_norm"] = p + "self_attn.q_norm.weight"
            names["k_norm"] = p + "self_attn.k_norm.weight"
        return names

    from ..attention import gqa
    return DecoderArch(spec=spec, rope_scaling=scaling, top=top_names(spec), layer_names=layer_names, attention=gqa,
                       rope_dim=head_dim)


def top_names(spec: ModelSpec) -> dict[str, str]:
    top = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight"}
    if not spec.tie_word_embeddings:
        top["lm_head"] = "lm_head.weight"
    return top


def stored_experts(get: Callable[[str], Any], layer: int, n_exp: int, ffn: int, per_expert: Callable[[int], tuple]):
    """(e, gate [F, H], up [F, H], down [H, F]) for every expert of `layer`, from either layout a checkpoint
    may have: per expert (`per_expert(e)` -> the three names; what transformers saves), or fused per layer
    as transformers holds them in memory: model.layers.i.mlp.experts.gate_up_proj [E, 2F, H] (gate rows
    first) and model.layers.i.mlp.experts.down_proj [E, H, F]."""
    p = f"model.layers.{layer}.mlp.experts."
    try:
        gate_up = get(p + "gate_up_proj")                                        # [E, 2F, H]
    except MissingTensorError:                                                   # the per-expert layout
        for e in range(n_exp):
            yield (e, *(get(n) for n in per_expert(e)))
        return
    down = get(p + "down_proj")                                                  # [E, H, F]
    if gate_up.shape[:2] != (n_exp, 2 * ffn) or down.shape[0] != n_exp:
        raise UnsupportedError(f"{p}gate_up_proj is {list(gate_up.shape)} and down_proj {list(down.shape)}; "
                               f"expected [{n_exp}, {2 * ffn}, H] and [{n_exp}, H, {ffn}]")
    for e in range(n_exp):
        yield e, gate_up[e, :ffn], gate_up[e, ffn:], down[e]


def sparse_moe(arch: DecoderArch, cfg: dict, *, ffn_key: str, normalize: bool, prefix: str = "mlp") -> DecoderArch:
    """Attach a Hugging Face-style sparse MLP: router `{prefix}.gate.weight` [E, H], experts
    `{prefix}.experts.E.{gate,up,down}_proj.weight`. Layers listed in mlp_only_layers, or skipped by
    decoder_sparse_step, are dense (as in transformers): their MLP has the dense names of layer_names."""
    import dataclasses
    # released checkpoints say num_experts; transformers 5 writes num_local_experts
    n_exp = cfg.get("num_experts") or require(cfg, "num_local_experts")
    top_k = require(cfg, "num_experts_per_tok")
    ffn = require(cfg, ffn_key)
    step = cfg.get("decoder_sparse_step") or 1
    dense = set(cfg.get("mlp_only_layers") or [])
    sparse = tuple(i for i in range(arch.spec.num_layers) if i not in dense and (i + 1) % step == 0)

    def experts(get, i: int):
        p = f"model.layers.{i}.{prefix}.experts."
        yield from stored_experts(get, i, n_exp, ffn, lambda e: (f"{p}{e}.gate_proj.weight", f"{p}{e}.up_proj.weight",
                                                                 f"{p}{e}.down_proj.weight"))

    moe = MoEArch(num_experts=n_exp, expert_intermediate_size=ffn, routing=softmax_topk(top_k, normalize),
                  sparse_layers=sparse, router=lambda get, i: get(f"model.layers.{i}.{prefix}.gate.weight"),
                  experts=experts)
    spec = dataclasses.replace(arch.spec, num_experts=n_exp, experts_per_token=top_k, expert_intermediate_size=ffn)
    return dataclasses.replace(arch, spec=spec, moe=moe)


def softmax_topk(top_k: int, normalize: bool) -> Routing:
    """Softmax over the experts, top-k, renormalised to sum to 1 if asked (Mixtral, Qwen-MoE, OLMoE)."""
    return Routing(scoring="softmax", top_k=top_k, normalize=normalize)


def deepseek_family(cfg: dict, routing: Routing) -> DecoderArch:
    """DeepSeek-V2/V3's layout: multi-head latent attention, the first `first_k_dense_replace` layers
    with a dense MLP and the rest sparse, with ungated shared experts, HF tensor names."""
    from ..attention import mla
    from ..rope import yarn_mscale
    reject(cfg, "hidden_act", ("silu",))
    reject(cfg, "attention_bias", (False,), " (DeepSeek checkpoints have no attention biases)")
    reject(cfg, "moe_layer_freq", (1,))
    theta, scaling = rope_config(cfg)
    hidden, heads, layers = require(cfg, "hidden_size"), require(cfg, "num_attention_heads"), require(cfg, "num_hidden_layers")
    nope, rope, v = require(cfg, "qk_nope_head_dim"), require(cfg, "qk_rope_head_dim"), require(cfg, "v_head_dim")
    scale = (nope + rope) ** -0.5
    if scaling and scaling.get("mscale_all_dim"):                 # YaRN scales q.k on every dim, not only rotary
        scale *= yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2
    shape = MLAShape(q_rank=cfg.get("q_lora_rank") or 0, kv_rank=require(cfg, "kv_lora_rank"), nope_dim=nope,
                     rope_dim=rope, v_dim=v, scale=scale, interleaved=bool(cfg.get("rope_interleave", True)))
    n_exp = cfg.get("n_routed_experts") or cfg.get("num_local_experts") or require(cfg, "num_experts")
    ffn = require(cfg, "moe_intermediate_size")
    first_dense = cfg.get("first_k_dense_replace") or 0
    spec = ModelSpec(
        architecture=cfg["model_type"], vocab_size=require(cfg, "vocab_size"), hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=heads, head_dim=nope + rope, intermediate_size=require(cfg, "intermediate_size"),
        max_context=cfg.get("max_position_embeddings") or 4096, rope_theta=theta, rope_scaling=rope_kind(scaling),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=False, qk_norm="", sliding_window=0, num_parameters=0, num_experts=n_exp,
        experts_per_token=routing.top_k, expert_intermediate_size=ffn, attention="mla")

    def layer_names(i: int) -> dict[str, str]:
        p = f"model.layers.{i}."
        a = p + "self_attn."
        names = {"input_norm": p + "input_layernorm.weight", "post_norm": p + "post_attention_layernorm.weight",
                 "kv_a": a + "kv_a_proj_with_mqa.weight", "kv_a_norm": a + "kv_a_layernorm.weight",
                 "kv_b": a + "kv_b_proj.weight", "o": a + "o_proj.weight"}
        if shape.q_rank:
            names.update(q_a=a + "q_a_proj.weight", q_a_norm=a + "q_a_layernorm.weight", q_b=a + "q_b_proj.weight")
        else:
            names["q"] = a + "q_proj.weight"
        for r in ("gate", "up", "down"):
            names[r] = p + f"mlp.{r}_proj.weight"
        return names

    def experts(get, i: int):
        p = f"model.layers.{i}.mlp.experts."
        yield from stored_experts(get, i, n_exp, ffn, lambda e: (f"{p}{e}.gate_proj.weight", f"{p}{e}.up_proj.weight",
                                                                 f"{p}{e}.down_proj.weight"))

    def shared(i: int) -> dict[str, str]:
        p = f"model.layers.{i}.mlp.shared_experts."
        return {r: f"{p}{r}_proj.weight" for r in ("gate", "up", "down")}

    moe = MoEArch(num_experts=n_exp, expert_intermediate_size=ffn, routing=routing,
                  sparse_layers=tuple(range(first_dense, layers)),
                  router=lambda get, i: get(f"model.layers.{i}.mlp.gate.weight"), experts=experts,
                  shared_expert=shared if cfg.get("n_shared_experts") else None,
                  router_bias=lambda get, i: get(f"model.layers.{i}.mlp.gate.e_score_correction_bias"))
    arch = DecoderArch(spec=spec, rope_scaling=scaling, top=top_names(spec), layer_names=layer_names, attention=mla,
                       rope_dim=rope, moe=moe, mla=shape)
    return arch
