"""Tiny random checkpoints of every supported architecture, made with transformers (the
reference) and saved as Hugging Face folders, plus a small byte-level tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

VOCAB = 272

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
              bos_token_id=256, eos_token_id=257, tie_word_embeddings=False)

CONFIGS = {
    "llama": dict(model_type="llama"),
    "llama-tied-rope3": dict(model_type="llama", tie_word_embeddings=True, attention_bias=True,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "mistral-window": dict(model_type="mistral", sliding_window=6),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=32),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen3_moe": dict(model_type="qwen3_moe", head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      norm_topk_prob=True),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=96, norm_topk_prob=False),
    "olmoe": dict(model_type="olmoe", num_experts=4, num_experts_per_tok=2, norm_topk_prob=False),
    # dense MLPs among the sparse ones: first and last layer dense; every other layer sparse
    "qwen3_moe-mixed": dict(model_type="qwen3_moe", head_dim=32, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=64, norm_topk_prob=True, num_hidden_layers=4, mlp_only_layers=[0, 3]),
    "qwen2_moe-mixed": dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                            shared_expert_intermediate_size=96, norm_topk_prob=False, num_hidden_layers=4,
                            decoder_sparse_step=2),
    # DeepSeek: multi-head latent attention (with and without the q LoRA), dense first layers, shared experts
    "deepseek_v2": dict(model_type="deepseek_v2", num_key_value_heads=4, num_hidden_layers=3, moe_intermediate_size=32,
                        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
                        topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False),
    "deepseek_v2-groups": dict(model_type="deepseek_v2", num_key_value_heads=4, num_hidden_layers=3,
                               moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
                               first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                               qk_nope_head_dim=16, v_head_dim=12, topk_method="group_limited_greedy", n_group=4,
                               topk_group=2, routed_scaling_factor=1.5, norm_topk_prob=False,
                               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                "original_max_position_embeddings": 32, "beta_fast": 32,
                                                "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
    "deepseek_v3": dict(model_type="deepseek_v3", num_key_value_heads=4, num_hidden_layers=3, moe_intermediate_size=32,
                        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
                        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                         "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                                         "mscale": 1.0, "mscale_all_dim": 1.0}),
    "deepseek_v3-plain": dict(model_type="deepseek_v3", num_key_value_heads=4, num_hidden_layers=2,
                              moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=0,
                              first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                              qk_nope_head_dim=16, v_head_dim=12, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                              norm_topk_prob=False, rope_interleave=False),
    # architectures without an export/arch file: exported through optimum
    "phi3": dict(model_type="phi3", pad_token_id=0),
    "gemma": dict(model_type="gemma", head_dim=16, num_key_value_heads=1, pad_token_id=0),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=128, n_inner=96),
}


def tokenizer_json() -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return tok.to_str()


def make(name: str, out: Path, seed: int = 0) -> Path:
    """Save a random transformers model of config `name` into `out`; returns `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    import transformers
    kw = {**COMMON, **CONFIGS[name]}
    model_type = kw.pop("model_type")
    if int(transformers.__version__.split(".")[0]) < 5 and "rope_parameters" in kw:
        rope = dict(kw.pop("rope_parameters"))       # transformers 4.x names it rope_scaling, theta apart
        kw["rope_theta"] = rope.pop("rope_theta")
        kw["rope_scaling"] = {**rope, "type": rope["rope_type"]}
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():   # random norms and biases too, so every weight matters in the comparison
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
        for n, b in model.named_buffers():                # DeepSeek-V3's routing bias (a buffer, saved)
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    (out / "tokenizer.json").write_text(tokenizer_json())
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    return out


def make_bert(out: Path, *, sentence_transformers: bool = False, seed: int = 0) -> Path:
    """A random BERT encoder with a word-level tokenizer ([CLS] text [SEP]); with sentence_transformers,
    the modules.json / 1_Pooling / Normalize files a sentence-transformers model has (CLS pooling, 32 tokens)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     max_position_embeddings=64)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(out, safe_serialization=True)
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{f"w{i}": i for i in range(4, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(out / "tokenizer.json"))
    if sentence_transformers:
        (out / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
        (out / "1_Pooling").mkdir(exist_ok=True)
        (out / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 64, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False,
             "pooling_mode_max_tokens": False}))
        (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32}))
    return out


WHISPER_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>", "<|transcribe|>",
                    "<|nospeech|>", "<|notimestamps|>"]
WHISPER_TINY = dict(d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
                    decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536, vocab_size=51865)


def make_whisper(out: Path, *, seed: int = 0, **dims) -> Path:
    """A random Whisper (tiny dims by default; WHISPER_TINY: whisper-tiny's shape) with a word-level
    tokenizer of 200 words + Whisper's special tokens, multilingual (en, de) generation settings and
    a few suppressed tokens, and the feature extractor's config."""
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
    torch.manual_seed(seed)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(200)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([AddedToken(t, special=True) for t in WHISPER_SPECIALS])
    ids = {t: tok.token_to_id(t) for t in WHISPER_SPECIALS}
    dims = {**dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                   encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=tok.get_vocab_size()), **dims}
    eot = ids["<|endoftext|>"]
    cfg = WhisperConfig(num_mel_bins=80, max_source_positions=1500, max_target_positions=448,
                        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=eot, pad_token_id=eot,
                        bos_token_id=eot, **dims)
    model = WhisperForConditionalGeneration(cfg)
    settings = dict(decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=eot, pad_token_id=eot,
                    no_timestamps_token_id=ids["<|notimestamps|>"], is_multilingual=True, forced_decoder_ids=None,
                    lang_to_id={"<|en|>": ids["<|en|>"], "<|de|>": ids["<|de|>"]},
                    task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
                    suppress_tokens=[5, 7, 11], begin_suppress_tokens=[eot, 3])
    for key, value in settings.items():      # Whisper's own fields, which GenerationConfig.update() skips
        setattr(model.generation_config, key, value)
    model.save_pretrained(out, safe_serialization=True)
    g = json.loads((out / "generation_config.json").read_text())
    g.pop("_from_model_config", None)          # else transformers rebuilds it from config.json on load
    (out / "generation_config.json").write_text(json.dumps(g))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out)
    return out
