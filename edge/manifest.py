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

FORMAT_VERSION = 2
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
    attention: str = "gqa"       # "gqa" or "mla" (multi-head latent attention), for information


CACHE_UPDATES = ("in_place", "append", "concat")


@dataclass(frozen=True)
class CacheBuffer:
    """One buffer of a layer's attention cache, as the graph reads and writes it.

    shape: the buffer at the full context, with -1 on its context (token) axis: GroupQueryAttention's
        keys [1, kv_heads, -1, head_dim]; MLA's latent and rotary key per token [1, -1, rank + rope_dim].
    update: "in_place": `input` and `output` are one buffer of the whole context, written by the graph
        itself at the step's positions; "append": `input` is the cache's first `position` tokens, and
        `output` the step's S new ones, which the runtime binds to tokens [position, position + S) of
        the buffer (the context axis is then the first that is not 1, so both are contiguous views).
    """
    input: str
    output: str
    shape: tuple[int, ...]
    dtype: str                   # "float32"
    update: str

    def __post_init__(self):
        if self.update not in CACHE_UPDATES:
            raise ValueError(f"unknown cache update {self.update!r} (known: {', '.join(CACHE_UPDATES)})")
        if self.dtype != "float32":
            raise ValueError(f"unsupported cache dtype {self.dtype!r} (known: float32)")
        if list(self.shape).count(-1) != 1 or any(d < 1 for d in self.shape if d != -1):
            raise ValueError(f"cache shape {list(self.shape)} must have one context axis (-1) and positive sizes")
        if self.update == "append" and any(d != 1 for d in self.shape[:self.shape.index(-1)]):
            raise ValueError(f"an appended cache's context axis must come first (after size-1 axes): {list(self.shape)}")

    def at(self, context_length: int) -> tuple[int, ...]:
        """The buffer's shape holding `context_length` tokens."""
        return tuple(context_length if d == -1 else d for d in self.shape)

    def bytes_per_token(self) -> int:
        n = 4
        for d in self.shape:
            n *= 1 if d == -1 else d
        return n


@dataclass(frozen=True)
class GraphSpec:
    """Names of the decoder graph's inputs and outputs; an input the graph does not take is "".

    input_ids [1, S] int64; logits [1, P, vocab]
    GroupQueryAttention graphs (edge's own): seqlens_k [1] int32 = total-1; total_sequence_length []
        int32; logits_positions [P] int64: which of the S positions get logits
    other graphs (optimum's): attention_mask [1, total] of ones; position_ids [1, S] (optional); logits
        for all S positions
    cache: every layer's attention cache buffers, in layer order (CacheBuffer).
    """
    file: str
    input_ids: str
    seqlens_k: str
    total_sequence_length: str
    logits_positions: str
    logits: str
    cache: tuple[CacheBuffer, ...]
    data: tuple[str, ...] = ()   # the external-data files its weights live in (memory planning)
    attention_mask: str = ""
    position_ids: str = ""

    def __post_init__(self):
        if not (self.seqlens_k and self.total_sequence_length) and not self.attention_mask:
            raise ValueError("the graph needs seqlens_k and total_sequence_length, or an attention_mask")

    def cache_bytes(self, context_length: int) -> int:
        """The attention cache's bytes at `context_length` tokens (what the runtime allocates)."""
        return sum(c.bytes_per_token() for c in self.cache) * context_length


@dataclass(frozen=True)
class StageSpec:
    """One graph of a Mixture-of-Experts pipeline, with its inputs and outputs by role.

    input roles: input_ids, hidden, residual, seqlens_k, total_sequence_length, logits_positions
    output roles: moe_in (the MLP's input), residual, router_logits, moe_shared (shared experts' output,
                  added to the routed experts'), logits; a dense layer's stage has no moe_in /
                  router_logits: it outputs hidden (its MLP's output)
    cache: which of the manifest's cache buffers (graph.cache) the stage reads and writes
    """
    file: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    cache: tuple[int, ...] = ()


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


SCORINGS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")


@dataclass(frozen=True)
class Routing:
    """How a MoE layer picks its experts from the router logits, and weighs them (edge/routing.py):

        scores = softmax(logits) or sigmoid(logits)
        choice = scores (+ the layer's correction bias, for choosing only)
        groups: experts split into `groups` equal groups, each scored by its best choice ("max",
            DeepSeek-V2) or the sum of its two best ("top2_sum", DeepSeek-V3); only the best
            `top_groups` groups may be chosen from
        ids = top_k of choice; weights = scores[ids], renormalised to sum to 1 if `normalize`, x `scale`
    """
    scoring: str
    top_k: int
    normalize: bool
    scale: float = 1.0                 # routed_scaling_factor
    groups: int = 1                    # n_group
    top_groups: int = 1                # topk_group
    group_score: str = "max"
    bias: bool = False                 # per-expert correction bias (e_score_correction_bias), fp32 [E] a layer

    def __post_init__(self):
        if self.scoring not in SCORINGS:
            raise ValueError(f"unknown routing scoring {self.scoring!r} (known: {', '.join(SCORINGS)})")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"unknown routing group score {self.group_score!r} (known: {', '.join(GROUP_SCORES)})")
        if self.top_k < 1 or self.groups < 1 or not 1 <= self.top_groups <= self.groups:
            raise ValueError(f"routing needs top_k >= 1 and 1 <= top_groups <= groups (top_k {self.top_k}, "
                             f"groups {self.groups}, top_groups {self.top_groups})")

    @property
    def qmoe_exact(self) -> bool:
        """onnxruntime's QMoE routes like this (softmax, top-k, renormalised; no groups, bias or scale)."""
        return self.scoring == "softmax" and self.normalize and self.groups == 1 and not self.bias and self.scale == 1.0


@dataclass(frozen=True)
class MoESpec:
    """Layers run as stages; between a layer's stage and the next, the runtime routes each token
    (`routing` over router_logits) and runs the chosen experts, each an instance of `expert_graph`
    with its weights read from `expert_file`."""
    stages: tuple[StageSpec, ...]          # one per decoder layer (MoE or dense), then the head
    expert_graph: str
    expert_input: str
    expert_output: str
    expert_file: str
    expert_tensors: tuple[ExpertTensor, ...]
    experts: tuple[ExpertEntry, ...]
    num_experts: int
    routing: Routing
    fused: GraphSpec | None = None         # everything in one graph (QMoE nodes): the all-resident path
    router_file: str = ""                  # where each layer's router weight lies, fp32 [H, E] (prefetch guesses)
    routers: tuple[int, ...] = ()          # byte offsets in router_file, one per MoE layer
    router_biases: tuple[int, ...] = ()    # routing.bias: each MoE layer's correction bias, fp32 [E], in router_file

    def __post_init__(self):
        if self.routing.bias and not self.router_biases:
            raise ValueError("routing.bias needs router_biases: one offset per MoE layer in router_file")
        if self.num_experts % self.routing.groups:
            raise ValueError(f"{self.num_experts} experts do not split into {self.routing.groups} routing groups")

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    def moe_layers(self) -> list[int | None]:
        """Per stage before the head: its MoE layer (the experts' numbering: the n-th stage with
        router_logits), None for a dense layer's stage (its MLP is inside)."""
        out, n = [], 0
        for st in self.stages[:-1]:
            out.append(n if "router_logits" in st.outputs else None)
            n += out[-1] is not None
        return out


POOLINGS = ("mean", "cls", "max", "last")


@dataclass(frozen=True)
class EmbeddingSpec:
    """A feature-extraction graph: input_ids, attention_mask [B, S] int64 (token_type_ids where the
    graph takes it, else "") -> `output` [B, S, hidden]; pooled over the unmasked tokens as the
    checkpoint's sentence-transformers config says ("mean" by default), then L2-normalised if asked."""
    file: str
    input_ids: str
    attention_mask: str
    token_type_ids: str
    output: str
    pooling: str
    normalize: bool
    max_length: int              # tokens a text is truncated to

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r} (known: {', '.join(POOLINGS)})")


@dataclass(frozen=True)
class SpeechCache:
    """One attention cache tensor of a speech decoder: its input `input`, filled by the prompt pass's
    output `first`, then replaced after each step by the output `step` ("" for the cross-attention
    keys and values, which stay as the prompt pass made them)."""
    input: str
    first: str
    step: str


AUDIO_FEATURES = ("whisper-log-mel",)


@dataclass(frozen=True)
class SpeechSpec:
    """Speech recognition as encoder + decoder (Whisper): the audio's log-mel features [1, n_mels,
    frames] -> `encoder` -> states; `decoder` runs the prompt tokens over them with its bool input
    `use_cache` false (the cache inputs empty) and fills every cache tensor, then one token at a time
    with `use_cache` true (optimum's merged decoder: one graph, one copy of the weights). Features: `features` names the recipe
    (edge/speech.py), with an STFT of n_fft / hop_length at sample_rate and the mel filter bank
    [n_fft // 2 + 1, n_mels] stored in `mel_filters` (float32, .npy); audio goes in chunk_seconds at a time."""
    encoder: str
    encoder_input: str
    encoder_output: str
    decoder: str
    use_cache: str
    input_ids: str
    encoder_states: str          # the decoder's input that takes the encoder's output
    logits: str
    cache: tuple[SpeechCache, ...]
    features: str
    sample_rate: int
    n_fft: int
    hop_length: int
    n_mels: int
    chunk_seconds: int
    mel_filters: str
    start_token: int             # decoder_start_token_id (<|startoftranscript|>)
    languages: dict[str, int]    # language code -> its token ("en" -> <|en|>); empty: an English-only model
    tasks: dict[str, int]        # "transcribe" / "translate" -> its token
    no_timestamps: int           # -1: none
    eos_token: int
    suppress_tokens: tuple[int, ...]
    begin_suppress_tokens: tuple[int, ...]   # also never the first token after the prompt
    max_tokens: int              # the decoder's positions (max_target_positions)

    def __post_init__(self):
        if self.features not in AUDIO_FEATURES:
            raise ValueError(f"unknown audio features {self.features!r} (known: {', '.join(AUDIO_FEATURES)})")


TASKS = ("text-generation", "feature-extraction", "automatic-speech-recognition")


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
    graph: GraphSpec | None      # dense: the whole decoder; MoE: its KV-cache fields (file = first stage);
                                 # None for the tasks that are not text generation
    tokenizer: TokenizerSpec
    generation: GenerationDefaults
    source: SourceInfo
    tensors: tuple[TensorEntry, ...] = field(default_factory=tuple)
    files: tuple[FileEntry, ...] = field(default_factory=tuple)
    moe: MoESpec | None = None
    task: str = "text-generation"            # one of TASKS; each other task has its section below
    embedding: EmbeddingSpec | None = None   # feature-extraction
    speech: SpeechSpec | None = None         # automatic-speech-recognition

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r} (known: {', '.join(TASKS)})")
        need = {"text-generation": ("graph", self.graph), "feature-extraction": ("embedding", self.embedding),
                "automatic-speech-recognition": ("speech", self.speech)}[self.task]
        if need[1] is None:
            raise ValueError(f"a {self.task} bundle needs its '{need[0]}' section")

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
        if version == 1:
            data = _from_version_1(data)
        elif version < FORMAT_VERSION:
            raise BundleError(f"bundle format {version} is older than this edge supports ({FORMAT_VERSION}): "
                              "re-export it with `edge export`")
        try:
            return from_dict(Manifest, data, "manifest")
        except ConfigError as e:
            raise BundleError(f"invalid manifest.json: {e}") from None


def _from_version_1(data: dict) -> dict:
    """A format-1 manifest in format 2's terms: its GQA-only KV fields become cache buffers (two per
    layer, written in place), its MoE stages' past/present roles their cache indices, and its
    routing fields a Routing (softmax, top-k, optionally renormalised: all that format 1 had)."""
    def graph(g: dict) -> dict:
        g = dict(g)
        shape = [1, g.pop("kv_num_heads", 0), -1, g.pop("kv_head_dim", 0)]
        dtype = g.pop("kv_dtype", "float32")
        ins, outs = (list(zip(g.pop(f"past_{r}", ()), g.pop(f"present_{r}", ()))) for r in ("keys", "values"))
        g["cache"] = [dict(input=i, output=o, shape=shape, dtype=dtype, update="in_place")
                      for pair in zip(ins, outs) for i, o in pair]
        return g
    try:
        data = dict(data, format_version=FORMAT_VERSION, graph=graph(data["graph"]))
        moe = data.get("moe")
        if isinstance(moe, dict):
            moe = dict(moe)
            stages, n = [], 0
            for st in moe.get("stages", ()):
                st = dict(st, inputs=dict(st["inputs"]), outputs=dict(st["outputs"]))
                if st["inputs"].pop("past_key", None) is not None:
                    for role in ("past_value",):
                        st["inputs"].pop(role, None)
                    for role in ("present_key", "present_value"):
                        st["outputs"].pop(role, None)
                    st["cache"] = [2 * n, 2 * n + 1]
                    n += 1
                stages.append(st)
            moe["stages"] = stages
            if moe.get("routing", "softmax_topk") != "softmax_topk":
                raise BundleError(f"format-1 routing {moe['routing']!r} is unknown; re-export it with `edge export`")
            moe["routing"] = dict(scoring="softmax", top_k=moe.pop("top_k"), normalize=moe.pop("normalize_topk"))
            if moe.get("fused"):
                moe["fused"] = graph(moe["fused"])
            data["moe"] = moe
    except (KeyError, TypeError, AttributeError) as e:
        raise BundleError(f"invalid format-1 manifest.json ({e!r}); re-export it with `edge export`") from None
    return data
