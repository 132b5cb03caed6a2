"""The bundle manifest: everything the runtime needs to know, nothing inferred from file names.

A bundle is a folder:
    manifest.json        this file's dataclasses, as JSON
    model.onnx           the decoder graph (weights in model.onnx.data, external data)
    tokenizer.json       Hugging Face tokenizers format
    chat_template.jinja  optional
The runtime runs what the manifest's `graph` section names; `model` is a normalised description
of the architecture for humans and planners, never branched on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from .errors import BundleError, ConfigError
from .schema import from_dict, to_dict

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ModelSpec:
    """Normalised architecture description (decoder-only transformer)."""
    architecture: str            # the source's HF model_type, for information only
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_context: int             # positions the rotary tables cover
    rope_theta: float
    rope_scaling: str            # "none", "linear", "llama3", ...
    norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: str                 # "": none, "head": RMSNorm over each head (Qwen3), "full": over all heads (OLMoE)
    sliding_window: int          # 0: full attention
    num_parameters: int
    num_experts: int = 0         # Mixture-of-Experts: experts per sparse layer (0: dense)
    experts_per_token: int = 0
    expert_intermediate_size: int = 0


@dataclass(frozen=True)
class GraphSpec:
    """Names of the decoder graph's inputs and outputs.

    input_ids [1, S] int64; seqlens_k [1] int32 = total-1; total_sequence_length [] int32;
    logits_positions [P] int64: which of the S positions get logits; logits [1, P, vocab].
    KV caches are [1, kv_heads, max_context, head_dim], past and present bound to one buffer.
    """
    file: str
    input_ids: str
    seqlens_k: str
    total_sequence_length: str
    logits_positions: str
    logits: str
    past_keys: tuple[str, ...]
    past_values: tuple[str, ...]
    present_keys: tuple[str, ...]
    present_values: tuple[str, ...]
    kv_num_heads: int
    kv_head_dim: int
    kv_dtype: str                # "float32"
    data: tuple[str, ...] = ()   # the external-data files its weights live in (memory planning)


@dataclass(frozen=True)
class StageSpec:
    """One graph of a Mixture-of-Experts pipeline, with its inputs and outputs by role.

    input roles: input_ids, hidden, residual, seqlens_k, total_sequence_length, logits_positions,
                 past_key, past_value
    output roles: moe_in (the MLP's input), residual, router_logits, present_key, present_value, logits;
                  a dense layer's stage has no moe_in / router_logits: it outputs hidden (its MLP's output)
    """
    file: str
    inputs: dict[str, str]
    outputs: dict[str, str]


@dataclass(frozen=True)
class ExpertTensor:
    """One tensor inside every expert's blob (the expert graph's initializer of that name)."""
    name: str
    dtype: str                   # as stored: "uint8", "float32", "float16"
    shape: tuple[int, ...]
    offset: int                  # bytes from the start of the blob
    load_as: str = ""            # the dtype the expert graph takes when it differs from the stored one
                                 # (fp16 scales are widened to fp32 when a session is built)


@dataclass(frozen=True)
class ExpertEntry:
    layer: int                   # the MoE layer: n for the n-th stage with router_logits (= decoder layer
                                 # when every layer is sparse)
    expert: int
    offset: int                  # in the expert file, 4 KiB aligned: one expert is one read
    size: int
    sha256: str


@dataclass(frozen=True)
class MoESpec:
    """Layers run as stages; between a layer's stage and the next, the runtime routes each token
    (softmax over router_logits, top_k, optional renormalisation) and runs the chosen experts,
    each an instance of `expert_graph` with its weights read from `expert_file`."""
    stages: tuple[StageSpec, ...]          # one per decoder layer (MoE or dense), then the head
    expert_graph: str
    expert_input: str
    expert_output: str
    expert_file: str
    expert_tensors: tuple[ExpertTensor, ...]
    experts: tuple[ExpertEntry, ...]
    num_experts: int
    top_k: int
    normalize_topk: bool
    routing: str = "softmax_topk"
    fused: GraphSpec | None = None         # everything in one graph (QMoE nodes): the all-resident path
    router_file: str = ""                  # where each layer's router weight lies, fp32 [H, E] (prefetch guesses)
    routers: tuple[int, ...] = ()          # byte offsets in router_file, one per MoE layer

    def moe_layers(self) -> list[int | None]:
        """Per stage before the head: its MoE layer (the experts' numbering: the n-th stage with
        router_logits), None for a dense layer's stage (its MLP is inside)."""
        out, n = [], 0
        for st in self.stages[:-1]:
            out.append(n if "router_logits" in st.outputs else None)
            n += out[-1] is not None
        return out


@dataclass(frozen=True)
class TokenizerSpec:
    file: str
    chat_template: str           # file name, "" when the model has none
    bos_token_id: int            # -1: none
    eos_token_ids: tuple[int, ...]
    add_bos_token: bool


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults from the checkpoint's generation_config.json (0 / 1.0 = off)."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class TensorEntry:
    """One weight as stored: its quantization and the error that quantization made."""
    name: str
    shape: tuple[int, ...]
    dtype: str                   # "float32", "int8", "int4"
    method: str = "none"         # "none", "rtn", "mse"
    block_size: int = 0
    symmetric: bool = True
    scale_dtype: str = "float32"  # how the per-block scales are stored ("float16": cast to fp32 at load)
    max_rel_err: float = 0.0     # max |w - q(w)| / max |w| over the tensor
    rms_rel_err: float = 0.0     # ||w - q(w)|| / ||w||
    calibrated: bool = False     # the search weighed input channels by importance from a calibration text


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class SourceInfo:
    path: str
    format: str                  # "hf-safetensors", "gguf"
    dtype: str
    calibration: str = ""        # the calibration text (name, sha256, tokens) when --calib was given


@dataclass(frozen=True)
class Manifest:
    format_version: int
    producer: str
    quant: str                   # the export's headline scheme: "fp32", "int8", "int4"
    model: ModelSpec
    graph: GraphSpec             # dense: the whole decoder; MoE: its KV-cache fields (file = first stage)
    tokenizer: TokenizerSpec
    generation: GenerationDefaults
    source: SourceInfo
    tensors: tuple[TensorEntry, ...] = field(default_factory=tuple)
    files: tuple[FileEntry, ...] = field(default_factory=tuple)
    moe: MoESpec | None = None

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=1)

    @staticmethod
    def from_json(text: str) -> "Manifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BundleError(f"manifest.json is not valid JSON ({e}); the bundle is corrupt: export it again") from None
        if not isinstance(data, dict):
            raise BundleError("manifest.json is not a JSON object; the bundle is corrupt: export it again")
        version = data.get("format_version")
        if not isinstance(version, int):
            raise BundleError("manifest.json has no format_version; this is not an edge bundle")
        if version > FORMAT_VERSION:
            raise BundleError(f"bundle format {version} is newer than this edge understands ({FORMAT_VERSION}): "
                              "upgrade edge (pip install -U edge)")
        if version < FORMAT_VERSION:
            raise BundleError(f"bundle format {version} is older than this edge supports ({FORMAT_VERSION}): "
                              "re-export it with `edge export`")
        try:
            return from_dict(Manifest, data, "manifest")
        except ConfigError as e:
            raise BundleError(f"invalid manifest.json: {e}") from None
