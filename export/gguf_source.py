"""A GGUF file as a checkpoint source: tensors dequantized to fp32 with the gguf package and
renamed to Hugging Face names, a config.json rebuilt from the metadata, and a tokenizer.json
rebuilt from the embedded vocabulary (byte-level BPE)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.errors import EdgeError, MissingTensorError, UnsupportedError

from .sources import TokenizerAssets

# GGUF architecture -> Hugging Face model_type
_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
# pre-tokenizer split patterns of the byte-level BPE vocabularies we rebuild
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE = {"default": None, "gpt2": None, "smollm": None, "llama-bpe": _LLAMA3, "qwen2": _QWEN2}


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER:
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}.{parts[3]}"
    raise UnsupportedError(f"GGUF tensor {gguf_name!r} has no Hugging Face equivalent edge knows")


class GGUFFile:
    format = "gguf"

    def __init__(self, path: Path):
        from gguf import GGUFReader
        self.path = path
        try:
            self.reader = GGUFReader(str(path))
        except Exception as e:  # the gguf package raises plain ValueError/struct errors on bad files
            raise EdgeError(f"{path} is truncated or not a GGUF file ({path.stat().st_size / 2**20:.1f} MB; the gguf "
                            f"reader says {type(e).__name__}: {e}); download or copy it again") from None
        self.fields = {k: f for k, f in self.reader.fields.items()}
        arch = self._meta("general.architecture")
        if arch not in _ARCHS:
            raise UnsupportedError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(_ARCHS)})")
        self.tensors = {}
        for t in self.reader.tensors:
            if t.name == "rope_freqs.weight":
                raise UnsupportedError("GGUF files with rope_freqs (llama3 rope scaling) are not supported; "
                                       "export the Hugging Face folder instead")
            self.tensors[_hf_name(t.name)] = t
        self.config = self._config(arch)
        self.types = sorted({t.tensor_type.name for t in self.reader.tensors})
        from .arch import lookup
        self._fixup = lookup(self.config["model_type"]).describe(self.config).gguf_fixup

    @property
    def dtype(self) -> str:
        return "+".join(self.types).lower()

    def _meta(self, key: str, default=None):
        f = self.fields.get(key)
        return default if f is None else f.contents()

    def _config(self, arch: str) -> dict:
        a = lambda k, d=None: self._meta(f"{arch}.{k}", d)
        tokens = self._meta("tokenizer.ggml.tokens") or []
        heads = int(a("attention.head_count"))
        hidden = int(a("embedding_length"))
        cfg = {"model_type": _ARCHS[arch], "hidden_size": hidden, "intermediate_size": int(a("feed_forward_length")),
               "num_hidden_layers": int(a("block_count")), "num_attention_heads": heads,
               "num_key_value_heads": int(a("attention.head_count_kv", heads)),
               "head_dim": int(a("attention.key_length", hidden // heads)),
               "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6)),
               "rope_theta": float(a("rope.freq_base", 10000.0)),
               "max_position_embeddings": int(a("context_length", 4096)),
               "vocab_size": int(a("vocab_size", len(tokens))), "hidden_act": "silu",
               "tie_word_embeddings": "lm_head.weight" not in self.tensors}
        scaling = a("rope.scaling.type")
        if scaling and scaling != "none":
            if scaling != "linear":
                raise UnsupportedError(f"GGUF rope scaling {scaling!r} is not supported")
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(a("rope.scaling.factor"))}
        return cfg

    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize
        if name not in self.tensors:
            raise MissingTensorError(f"tensor {name!r} is not in {self.path}")
        t = self.tensors[name]
        shape = [int(x) for x in reversed(t.shape.tolist())]    # GGUF lists dims innermost first
        raw = t.data.reshape(shape[0], -1) if len(shape) > 1 else t.data.reshape(1, -1)   # [rows, row bytes]
        a = np.empty((raw.shape[0], int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]), np.float32)
        for r in range(0, raw.shape[0], 4096):    # row chunks keep dequantization temporaries small
            a[r:r + 4096] = dequantize(raw[r:r + 4096], t.tensor_type).reshape(len(raw[r:r + 4096]), -1)
        a = a.reshape(shape)
        return self._fixup(name, a) if self._fixup else a

    def generation_config(self) -> dict:
        return {}

    def tokenizer(self) -> TokenizerAssets:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
        kind = self._meta("tokenizer.ggml.model")
        pre = self._meta("tokenizer.ggml.pre", "default")
        if kind != "gpt2" or pre not in _PRE:
            raise UnsupportedError(f"GGUF tokenizer {kind!r} (pre {pre!r}) cannot be rebuilt; supported: byte-level "
                                   f"BPE with pre {', '.join(_PRE)}. Export the Hugging Face folder instead")
        tokens = list(self._meta("tokenizer.ggml.tokens"))
        types = list(self._meta("tokenizer.ggml.token_type") or [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in self._meta("tokenizer.ggml.merges") or []]
        tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
        if _PRE[pre] is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_PRE[pre]), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, ty in enumerate(types) if ty == 3])        # CONTROL tokens
        tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, ty in enumerate(types) if ty == 4])               # USER_DEFINED tokens
        bos = self._meta("tokenizer.ggml.bos_token_id")
        eos = self._meta("tokenizer.ggml.eos_token_id")
        return TokenizerAssets(tok.to_str(), self._meta("tokenizer.chat_template", "") or "",
                               int(bos) if bos is not None else -1, (int(eos),) if eos is not None else (),
                               bool(self._meta("tokenizer.ggml.add_bos_token", False)))
