"""Every architecture without a file in export/arch/: optimum exports the ONNX graphs for the task,
and edge quantizes their linear layers and wraps them in a normal bundle.

optimum-onnx (Hugging Face's ONNX exporter) knows how to trace hundreds of transformers models with
their KV caches; re-implementing those is not worth it. Its graphs are plain ONNX (MatMul, Gemm,
attention written out, past and present keys concatenated), so they run slower than edge's own
fused graphs: edge's own path stays the default where there is one. What edge adds:

    quantize_graph   each MatMul / Gemm whose weight is a constant [K, N] becomes MatMulNBits (int8
                     or int4, accuracy_level 4, export/quant.py's search), with the same error report
                     per tensor as edge's own export
    manifest         the graphs' inputs and outputs by role (GraphSpec, EmbeddingSpec, SpeechSpec),
                     read by the runtime, which never sees the architecture's name

The export loads the whole model with torch (optimum traces it): a dev-machine step.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from edge.errors import ConfigError, EdgeError, UnsupportedError
from edge.manifest import (CacheBuffer, EmbeddingSpec, GraphSpec, ModelSpec, SpeechCache, SpeechSpec,
                           TensorEntry)

from .quant import QuantScheme, quantize

# edge's task name -> optimum's (with the KV cache where the task has one)
OPTIMUM_TASKS = {"text-generation": "text-generation-with-past", "feature-extraction": "feature-extraction",
                 "automatic-speech-recognition": "automatic-speech-recognition-with-past"}
MS = "com.microsoft"


def task_of(config: dict) -> str:
    """The task a checkpoint's config asks for: its head's class name (architectures)."""
    archs = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "text-generation"
    if any(a.endswith("ForConditionalGeneration") for a in archs) and "num_mel_bins" in config:
        return "automatic-speech-recognition"
    return "feature-extraction"


def run_optimum(src: Path, out: Path, task: str) -> None:
    """optimum's ONNX export of `src` for `task` into `out` (fp32; a speech decoder's two graphs merged)."""
    try:
        # main_export's module registers the ONNX exporter's model types with TasksManager
        from optimum.exporters.onnx import main_export  # noqa: F401
        from optimum.exporters.tasks import TasksManager
    except ImportError:
        raise EdgeError("this model needs optimum's exporter: pip install 'edge[optimum]' (optimum-onnx, with torch)") from None
    if task not in OPTIMUM_TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(OPTIMUM_TASKS)}")
    model_type = json.loads((src / "config.json").read_text()).get("model_type", "?")
    supported = TasksManager.get_supported_model_type_for_task(OPTIMUM_TASKS[task], exporter="onnx")
    if model_type.replace("_", "-") not in supported and model_type not in supported:
        raise UnsupportedError(f"optimum cannot export {model_type!r} for {task}; it exports "
                               f"{', '.join(sorted(supported))}")
    # in a process of its own: it loads the whole model with torch (its memory is returned when it
    # exits) and makes onnxruntime sessions of its own, which a process using edge's global pool refuses
    # post-processing merges a speech decoder's two graphs (prompt, then steps) into one that shares
    # their weights (an If on use_cache_branch); nothing else needs it
    args = dict(model_name_or_path=str(src), output=str(out), task=OPTIMUM_TASKS[task], do_validation=False,
                no_post_process=task != "automatic-speech-recognition", library_name="transformers", device="cpu")
    r = subprocess.run([sys.executable, "-c", _RUN, json.dumps(args)], capture_output=True, text=True)
    if r.returncode != 0:
        lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
        raise EdgeError(f"optimum could not export {src} for {task}: {lines[-1] if lines else 'no message'}")


_RUN = """
import json, logging, sys, warnings
warnings.simplefilter("ignore")                 # tracer warnings: torch's, about shapes it fixed
logging.disable(logging.WARNING)
from optimum.exporters.onnx import main_export
main_export(**json.loads(sys.argv[1]))
"""


def _subgraphs(node):
    from onnx import AttributeProto
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            yield a.g
        elif a.type == AttributeProto.GRAPHS:
            yield from a.graphs


def _all_nodes(graph):
    """The graph's nodes and those of its subgraphs (If branches: optimum's merged decoders)."""
    for n in graph.node:
        yield n
        for sub in _subgraphs(n):
            yield from _all_nodes(sub)


def quantize_graph(model, scheme: QuantScheme | None, embedding: QuantScheme | None = None, *,
                   head: QuantScheme | None = None) -> tuple[object, list[TensorEntry]]:
    """MatMul(x, W) and Gemm(x, W, b) with W a constant float32 [K, N] (Gemm: transB read, a 1-D bias)
    -> MatMulNBits over W^T [N, K], and Gather(E, ids) of a constant table E [V, H] ->
    GatherBlockQuantized at `embedding` (only the gathered rows are read: int8 costs no speed), in
    place, in subgraphs too (a merged decoder's two branches share one quantized copy); the rest is
    left as optimum made it. The linear layer that writes the graph's `logits` gets `head` (as edge's
    own export: a tied head at the embedding's int8). Returns the model and one TensorEntry per
    weight (fp32 ones too, for the report)."""
    import onnx
    from onnx import helper, numpy_helper
    top = model.graph
    inits = {t.name: t for t in top.initializer}
    # torch's exporter shares equal constants through Identity nodes
    alias = {n.output[0]: n.input[0] for n in _all_nodes(top) if n.op_type == "Identity" and n.input[0] in inits}
    # and a tied head as MatMul(x, Transpose(embedding)) (optimum's merged decoders)
    transposed_of = {n.output[0]: alias.get(n.input[0], n.input[0]) for n in _all_nodes(top)
                     if n.op_type == "Transpose" and alias.get(n.input[0], n.input[0]) in inits
                     and [list(a.ints) for a in n.attribute if a.name == "perm"] in ([], [[1, 0]])}
    uses: dict[str, int] = {}
    for n in _all_nodes(top):
        for x in n.input:
            uses[alias.get(x, x)] = uses.get(alias.get(x, x), 0) + 1
    entries, done = [], {}              # done: (weight, transposed, scheme) -> names of its quantized tensors

    def add(name: str, array: np.ndarray) -> str:
        top.initializer.append(numpy_helper.from_array(array, name))
        return name

    def linear(n, scheme: QuantScheme | None):
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        wname = alias.get(n.input[1], n.input[1]) if len(n.input) > 1 else ""
        through_transpose = n.op_type == "MatMul" and wname in transposed_of
        if through_transpose:
            wname = transposed_of[wname]
        w = inits.get(wname)
        bias = n.input[2] if n.op_type == "Gemm" and len(n.input) > 2 else ""
        plain = n.op_type == "MatMul" or (n.op_type == "Gemm" and not attrs.get("transA", 0)
                                          and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
                                          and (not bias or len(inits.get(alias.get(bias, bias), w).dims) == 1))
        if w is None or len(w.dims) != 2 or w.data_type != onnx.TensorProto.FLOAT or not plain:
            return n
        transposed = bool(n.op_type == "Gemm" and attrs.get("transB", 0)) or through_transpose
        key = (wname, transposed, scheme)
        if key not in done:
            weight = numpy_helper.to_array(w)
            weight = np.ascontiguousarray(weight if transposed else weight.T, np.float32)        # [N, K]
            # the report names a weight by its node where torch's exporter named it "onnx::MatMul_123"
            label = wname if not wname.startswith("onnx::") else (n.name or wname).strip("/")
            if scheme is None:
                entries.append(TensorEntry(name=label, shape=tuple(weight.shape), dtype="float32"))
                done[key] = None
            else:
                q = quantize(weight, scheme)
                entries.append(_entry(label, weight.shape, q))
                base = f"{label}.{scheme.dtype}"
                done[key] = (add(base + ".qweight", q.packed), add(base + ".scales", q.scales.astype(np.float32)),
                             add(base + ".zero_points", q.zero_points) if q.zero_points is not None else "",
                             weight.shape)
        if not through_transpose:      # (a Transpose node is the reader then; it goes when nothing reads it)
            uses[wname] -= 1
        if done[key] is None:
            return n
        if uses[wname] == 0:
            w.ClearField("raw_data")                                 # nothing else reads it: free it now
        qweight, scales, zero_points, (out_features, in_features) = done[key]
        ins = [n.input[0], qweight, scales, zero_points] + (["", bias] if bias else [])   # bias: input 5
        return helper.make_node("MatMulNBits", ins, [n.output[0]], name=n.name, domain=MS, K=in_features,
                                N=out_features, bits=scheme.bits, block_size=scheme.block_size, accuracy_level=4)

    def rewrite(graph, logits_here: bool) -> None:
        nodes = []
        for n in graph.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute if a.name == "axis"}
            table = inits.get(alias.get(n.input[0], n.input[0])) if n.op_type == "Gather" and n.input else None
            if table is not None and embedding is not None and len(table.dims) == 2 and attrs.get("axis", 0) == 0 \
                    and table.data_type == onnx.TensorProto.FLOAT and table.dims[1] % embedding.block_size == 0:
                nodes.append(_quantized_gather(top, n, table, embedding, entries, done))
                continue
            for sub in _subgraphs(n):
                rewrite(sub, logits_here and "logits" in {o.name for o in sub.output})
            is_head = logits_here and n.output and n.output[0] == "logits"
            nodes.append(linear(n, head if is_head else scheme) if n.op_type in ("MatMul", "Gemm") else n)
        del graph.node[:]
        graph.node.extend(nodes)

    rewrite(top, "logits" in {o.name for o in top.output})
    # drop what no node reads any more: Identity aliases and Transposes of a quantized weight, then the weight
    outputs = {o.name for o in top.output} | {o.name for n in _all_nodes(top) for sub in _subgraphs(n) for o in sub.output}

    def dead(n) -> bool:       # a weight's alias or transpose that nothing reads
        return n.op_type in ("Identity", "Transpose") and alias.get(n.input[0], n.input[0]) in inits \
            and n.output[0] not in read
    while True:
        read = {x for n in _all_nodes(top) for x in n.input} | outputs
        if not any(dead(n) for n in _all_nodes(top)):
            break
        for graph in [top, *(sub for n in _all_nodes(top) for sub in _subgraphs(n))]:
            keep = [n for n in graph.node if not dead(n)]
            if len(keep) != len(graph.node):
                del graph.node[:]
                graph.node.extend(keep)
    keep = [t for t in top.initializer if t.name in read]
    del top.initializer[:]
    top.initializer.extend(keep)
    if (scheme or embedding or head) is not None and not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))
    return model, entries


def _entry(name: str, shape, q) -> TensorEntry:
    """The manifest's record of one quantized weight and the error its quantization made."""
    return TensorEntry(name=name, shape=tuple(shape), dtype=q.scheme.dtype, method=q.scheme.method,
                       block_size=q.scheme.block_size, symmetric=q.scheme.symmetric, max_rel_err=q.max_rel_err,
                       rms_rel_err=q.rms_rel_err)


def _quantized_gather(g, node, table, scheme: QuantScheme, entries: list, done: dict):
    """GatherBlockQuantized over `table` [V, H] quantized along H (the node's replacement)."""
    from onnx import helper, numpy_helper
    key = (table.name, "gather", scheme)
    if key not in done:
        w = numpy_helper.to_array(table).astype(np.float32)
        q = quantize(w, scheme)
        entries.append(_entry(table.name, w.shape, q))
        base = f"{table.name}.gather.{scheme.dtype}"
        names = [base + ".qweight", base + ".scales"]
        g.initializer.extend([numpy_helper.from_array(q.packed.reshape(w.shape[0], -1), names[0]),
                              numpy_helper.from_array(q.scales.astype(np.float32), names[1])])
        if q.zero_points is not None:
            g.initializer.append(numpy_helper.from_array(q.zero_points, base + ".zero_points"))
            names.append(base + ".zero_points")
        done[key] = names
    qweight, scales, *zero_points = done[key]
    return helper.make_node("GatherBlockQuantized", [qweight, node.input[1], scales, *zero_points], list(node.output),
                            name=node.name or table.name, domain=MS, gather_axis=0, quantize_axis=1,
                            block_size=scheme.block_size, bits=scheme.bits)


def save_graph(model, folder: Path, name: str) -> list[str]:
    """`name` and its external data file (name + ".data") in `folder`; returns both file names."""
    import onnx
    onnx.save_model(model, str(folder / name), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=name + ".data", size_threshold=1024)
    return [name, name + ".data"] if (folder / (name + ".data")).exists() else [name]


def _shape(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _cache_buffer(value_info, output: str) -> CacheBuffer:
    """optimum's past_key_values.N.key [batch, heads, past_sequence_length, head_dim] -> a concat buffer."""
    dims = _shape(value_info)
    shape = tuple(1 if i == 0 else -1 if isinstance(d, str) else int(d) for i, d in enumerate(dims))
    return CacheBuffer(input=value_info.name, output=output, shape=shape, dtype="float32", update="concat")


def decoder_graph(model, file: str, data: tuple[str, ...]) -> GraphSpec:
    """The GraphSpec of optimum's text-generation-with-past graph, from its inputs and outputs."""
    ins = {i.name: i for i in model.graph.input}
    outs = [o.name for o in model.graph.output]
    cache = [_cache_buffer(ins[n], n.replace("past_key_values", "present")) for n in ins if n.startswith("past_key_values.")]
    missing = [c.output for c in cache if c.output not in outs]
    if "input_ids" not in ins or "attention_mask" not in ins or "logits" not in outs or missing or not cache:
        raise UnsupportedError(f"optimum's graph has inputs {sorted(ins)} and outputs {outs}; edge runs decoders with "
                               "input_ids, attention_mask, past_key_values.* -> logits, present.*")
    return GraphSpec(file=file, input_ids="input_ids", seqlens_k="", total_sequence_length="", logits_positions="",
                     logits="logits", cache=tuple(cache), data=data, attention_mask="attention_mask",
                     position_ids="position_ids" if "position_ids" in ins else "")


def model_spec(config: dict, *, num_parameters: int, max_context: int) -> ModelSpec:
    """A normalised description for humans and the planner (never branched on): the usual config
    keys under their several names (GPT-2's n_embd, Whisper's d_model, ...)."""
    def pick(*keys, default=0):
        for k in keys:
            if isinstance(config.get(k), (int, float)) and not isinstance(config.get(k), bool):
                return config[k]
        return default
    hidden = int(pick("hidden_size", "n_embd", "d_model"))
    heads = int(pick("num_attention_heads", "n_head", "decoder_attention_heads", default=1))
    return ModelSpec(architecture=str(config.get("model_type", "?")), vocab_size=int(pick("vocab_size")),
                     hidden_size=hidden, num_layers=int(pick("num_hidden_layers", "n_layer", "decoder_layers")),
                     num_heads=heads, num_kv_heads=int(pick("num_key_value_heads", default=heads)),
                     head_dim=int(pick("head_dim", default=hidden // max(heads, 1))),
                     intermediate_size=int(pick("intermediate_size", "n_inner", "decoder_ffn_dim", default=4 * hidden)),
                     max_context=max_context, rope_theta=float(pick("rope_theta", default=0.0)), rope_scaling="none",
                     norm_eps=float(pick("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", default=1e-5)),
                     tie_word_embeddings=bool(config.get("tie_word_embeddings", True)), attention_bias=False,
                     qk_norm="", sliding_window=int(config.get("sliding_window") or 0), num_parameters=num_parameters)


def max_positions(config: dict) -> int:
    for k in ("max_position_embeddings", "n_positions", "max_target_positions"):
        if isinstance(config.get(k), int):
            return config[k]
    return 2048


def pooling(src: Path) -> tuple[str, bool, int]:
    """(pooling, normalize, max_length) from a sentence-transformers folder (modules.json,
    1_Pooling/config.json, sentence_bert_config.json); mean pooling and L2 normalisation otherwise."""
    modules = src / "modules.json"
    if not modules.is_file():
        return "mean", True, 0
    mods = json.loads(modules.read_text())
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in mods)
    mode = "mean"
    for m in mods:
        if str(m.get("type", "")).endswith("Pooling"):
            cfg = json.loads((src / m.get("path", "") / "config.json").read_text())
            modes = {"cls": cfg.get("pooling_mode_cls_token"), "mean": cfg.get("pooling_mode_mean_tokens"),
                     "max": cfg.get("pooling_mode_max_tokens"), "last": cfg.get("pooling_mode_lasttoken")}
            chosen = [k for k, v in modes.items() if v]
            if len(chosen) != 1 or any(cfg.get(k) for k in ("pooling_mode_mean_sqrt_len_tokens",
                                                             "pooling_mode_weightedmean_tokens")):
                raise UnsupportedError(f"{src}: pooling {cfg} is not supported; edge pools by one of cls, mean, "
                                       "max or last token")
            mode = chosen[0]
    st = src / "sentence_bert_config.json"
    length = int(json.loads(st.read_text()).get("max_seq_length") or 0) if st.is_file() else 0
    return mode, normalize, length


def embedding_spec(model, file: str, src: Path, config: dict) -> EmbeddingSpec:
    ins = {i.name for i in model.graph.input}
    outs = [o.name for o in model.graph.output]
    if not {"input_ids", "attention_mask"} <= ins or "last_hidden_state" not in outs:
        raise UnsupportedError(f"optimum's feature-extraction graph has inputs {sorted(ins)} and outputs {outs}; "
                               "edge embeds with input_ids, attention_mask -> last_hidden_state")
    mode, normalize, length = pooling(src)
    return EmbeddingSpec(file=file, input_ids="input_ids", attention_mask="attention_mask",
                         token_type_ids="token_type_ids" if "token_type_ids" in ins else "", output="last_hidden_state",
                         pooling=mode, normalize=normalize, max_length=length or max_positions(config))


def speech_spec(encoder, decoder, src: Path, config: dict, gen: dict,
                files: dict[str, str]) -> tuple[SpeechSpec, np.ndarray]:
    """Whisper's graphs (optimum: encoder_model, decoder_model_merged) by role, and the mel filter
    bank its feature extractor computes (stored so the runtime need not)."""
    from transformers import WhisperFeatureExtractor
    fe = WhisperFeatureExtractor.from_pretrained(str(src))
    enc_in, enc_out = encoder.graph.input[0].name, encoder.graph.output[0].name
    ins = {i.name: i for i in decoder.graph.input}
    outs = {o.name: o for o in decoder.graph.output}
    cache = []
    for name, value in ins.items():
        if not name.startswith("past_key_values."):
            continue
        present = name.replace("past_key_values", "present")
        if present not in outs:
            raise UnsupportedError(f"the speech decoder has no output {present} for {name}")
        # a cache whose length the step does not change (the encoder's keys and values) stays as the
        # first pass made it
        grows = _shape(outs[present])[2] != _shape(value)[2]
        cache.append(SpeechCache(input=name, first=present, step=present if grows else ""))
    if not {"encoder_hidden_states", "input_ids", "use_cache_branch"} <= set(ins) or not cache:
        raise UnsupportedError(f"the speech decoder takes {sorted(ins)}; edge needs optimum's merged decoder "
                               "(input_ids, encoder_hidden_states, past_key_values.*, use_cache_branch)")

    def ids(v) -> dict[str, int]:
        return {str(k).strip("<|>"): int(t) for k, t in (v or {}).items()}
    return SpeechSpec(encoder=files["encoder"], encoder_input=enc_in, encoder_output=enc_out,
                      decoder=files["decoder"], use_cache="use_cache_branch", input_ids="input_ids",
                      encoder_states="encoder_hidden_states", logits="logits", cache=tuple(cache),
                      features="whisper-log-mel", sample_rate=int(fe.sampling_rate), n_fft=int(fe.n_fft),
                      hop_length=int(fe.hop_length), n_mels=int(fe.feature_size), chunk_seconds=int(fe.chunk_length),
                      mel_filters=files["mel_filters"],
                      start_token=int(gen.get("decoder_start_token_id", config.get("decoder_start_token_id"))),
                      languages=ids(gen.get("lang_to_id")), tasks=ids(gen.get("task_to_id")),
                      no_timestamps=int(gen.get("no_timestamps_token_id", -1)),
                      eos_token=int(gen.get("eos_token_id", config.get("eos_token_id"))),
                      suppress_tokens=tuple(int(t) for t in gen.get("suppress_tokens") or config.get("suppress_tokens") or ()),
                      begin_suppress_tokens=tuple(int(t) for t in gen.get("begin_suppress_tokens")
                                                  or config.get("begin_suppress_tokens") or ()),
                      max_tokens=int(config.get("max_target_positions", 448))), fe.mel_filters


def build_with_optimum(src: Path, tmp: Path, scheme: QuantScheme | None, *, embedding: QuantScheme | None,
                       head: QuantScheme | None, task: str, config: dict, gen: dict,
                       progress=lambda done, total: None) -> dict:
    """optimum's export of `src` quantized into bundle folder `tmp`: the manifest's task sections,
    tensors and files."""
    import onnx
    raw = Path(tempfile.mkdtemp(prefix=".optimum-", dir=tmp.parent))
    try:
        run_optimum(src, raw, task)
        names = {"text-generation": {"model": "model.onnx"}, "feature-extraction": {"model": "model.onnx"},
                 "automatic-speech-recognition": {"encoder": "encoder_model.onnx",
                                                  "decoder": "decoder_model_merged.onnx"}}[task]
        graphs, tensors, files = {}, [], []
        for i, (role, name) in enumerate(names.items()):
            if not (raw / name).is_file():
                raise UnsupportedError(f"optimum made {sorted(p.name for p in raw.glob('*.onnx'))}, not {name}")
            model = onnx.load(str(raw / name))
            model, entries = quantize_graph(model, scheme, embedding, head=head)
            out = "model.onnx" if role == "model" else f"{role}.onnx"
            files += save_graph(model, tmp, out)
            graphs[role] = (model, out)
            tensors += [e if role == "model" else TensorEntry(**{**e.__dict__, "name": f"{role}/{e.name}"}) for e in entries]
            progress(i + 1, len(names))
        result = dict(tensors=tuple(tensors), files=files, task=task)
        if task == "text-generation":
            model, out = graphs["model"]
            result["graph"] = decoder_graph(model, out, tuple(f for f in files if f.endswith(".data")))
        elif task == "feature-extraction":
            model, out = graphs["model"]
            result["embedding"] = embedding_spec(model, out, src, config)
        else:
            spec_files = {role: out for role, (_, out) in graphs.items()} | {"mel_filters": "mel_filters.npy"}
            spec, filters = speech_spec(graphs["encoder"][0], graphs["decoder"][0], src, config, gen, spec_files)
            np.save(tmp / "mel_filters.npy", np.asarray(filters, np.float32))
            files.append("mel_filters.npy")
            result["speech"] = spec
        return result
    finally:
        shutil.rmtree(raw, ignore_errors=True)
