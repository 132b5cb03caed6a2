"""Calibration: the statistics of every linear layer's input on a text. The mse search weighs input
channels by their mean x² (the idea of llama.cpp's importance matrix); gptq needs the whole second
moment X^T X to carry each column's rounding error into the columns not yet quantized.

    source ─► fp32 bundle (a temporary folder, context = one window)
           ─► every graph gets one more output per linear: its input x [.., K]
           ─► the text runs through in disjoint windows
           ─► stats[name] = tokens n, sum of x² [K], and with gram=True X^T X [K, K] (fp32)

An MoE's stages and experts run as the runtime's staged pipeline does (route, then each expert on
the tokens routed to it), so an expert's importance averages only over its own tokens; an expert
the text never reaches gets none (plain weighted search). Names are the manifest's tensor names
("layers.3.qkv", "layers.3.experts.5.down", "lm_head").
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edge.bundle import Bundle, open_bundle
from edge.engine import default_threads, open_session, pooled_options, use_global_pool
from edge.errors import ConfigError
from edge.experts import ExpertCache
from edge.moe import route
from edge.text import Text

CONTEXT = 512
EXPERT_PREFIX = "expert."           # the expert graph's tensor names; the manifest's are layers.{i}.experts.{e}.


@dataclass(frozen=True)
class Activations:
    """What one linear layer's input looked like on the calibration text."""
    n: int                          # tokens seen
    sq: np.ndarray                  # sum of x² per input channel [K]
    gram: np.ndarray | None         # X^T X [K, K] (fp32), when collected

    @property
    def importance(self) -> np.ndarray:
        return (self.sq / self.n).astype(np.float32)                         # mean x² [K]


@dataclass(frozen=True)
class Calibration:
    stats: dict[str, Activations]        # tensor name -> its input's statistics
    tokens: int
    text_sha256: str

    @property
    def importance(self) -> dict[str, np.ndarray]:
        return {k: a.importance for k, a in self.stats.items()}

    def describe(self, path: str) -> str:
        return f"{Path(path).name} (sha256 {self.text_sha256[:16]}, {self.tokens} tokens)"


class _Acc:
    def __init__(self, gram: bool):
        self.want_gram = gram
        self.sum: dict[str, np.ndarray] = {}
        self.gram: dict[str, np.ndarray] = {}
        self.n: dict[str, int] = {}

    def add(self, name: str, x: np.ndarray) -> None:
        x = x.reshape(-1, x.shape[-1])                                      # [tokens, K]
        self.sum[name] = self.sum.get(name, 0.0) + np.square(x, dtype=np.float64).sum(0)
        self.n[name] = self.n.get(name, 0) + x.shape[0]
        if self.want_gram:
            x = x.astype(np.float32, copy=False)
            if name in self.gram:
                self.gram[name] += x.T @ x                                  # [K, K]
            else:
                self.gram[name] = x.T @ x

    def result(self) -> dict[str, Activations]:
        return {k: Activations(self.n[k], s, self.gram.get(k)) for k, s in self.sum.items()}


def _instrument(path: Path, names: set[str]) -> tuple[Path, dict[str, list[str]]]:
    """A copy of the graph (next to its external data) in which the input of each MatMul node named
    in `names` is also an output. Returns (its path, {graph output: the tensor names it feeds})."""
    m = onnx.load(str(path), load_external_data=False)
    taps: dict[str, list[str]] = {}
    for node in m.graph.node:
        if node.op_type == "MatMul" and node.name in names:
            if node.input[0] not in taps:
                m.graph.output.append(helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, None))
            taps.setdefault(node.input[0], []).append(node.name)
    out = path.with_name("calib." + path.name)
    onnx.save(m, str(out))
    return out, taps


def _add(acc: "_Acc", taps: dict[str, list[str]], values: dict[str, np.ndarray], prefix: str = "") -> None:
    for name, tensors in taps.items():
        for t in tensors:
            acc.add(prefix + t, values[name])


def collect(src: str, text_path: str, *, max_tokens: int, gram: bool = False, threads: int = 0,
            workdir: Path | None = None) -> Calibration:
    """Input statistics of every linear layer of `src` on the text in `text_path` (its first `max_tokens`
    tokens); `gram` adds X^T X (SmolMoE: 240 experts x (576² + 1536²) x 4 bytes = 2.6 GB)."""
    from . import ExportOptions, export_model         # a calibration is a small fp32 export run on the text

    try:
        text = Path(text_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--calib {text_path}: cannot read it as UTF-8 text ({e})") from None
    tmp = Path(tempfile.mkdtemp(prefix=".edge-calib-", dir=workdir))
    try:
        rep = export_model(src, tmp / "fp32", ExportOptions(quant="fp32", max_context=CONTEXT), progress=False)
        bundle = open_bundle(rep.out)
        m = bundle.manifest
        ids = Text(m.tokenizer, bundle.path(m.tokenizer.file), None).encode(text)[:max_tokens]
        ctx = m.model.max_context                            # CONTEXT, or less for a model with a short one
        if len(ids) < ctx // 4:
            raise ConfigError(f"--calib {text_path}: only {len(ids)} tokens; give it at least {ctx // 4}")
        use_global_pool(threads or default_threads())
        acc = _Acc(gram)
        run = _run_moe if m.moe else _run_dense
        run(bundle, ids, acc, ctx)
        return Calibration(acc.result(), len(ids), hashlib.sha256(text.encode()).hexdigest())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _windows(ids: list[int], ctx: int):
    for i in range(0, len(ids), ctx):
        yield np.asarray(ids[i:i + ctx], np.int64)[None]                        # [1, S]


def _step(s: int) -> dict[str, np.ndarray]:
    return {"seqlens_k": np.array([s - 1], np.int32), "total_sequence_length": np.array(s, np.int32)}


def _linears(bundle: Bundle) -> set[str]:
    return {t.name for t in bundle.manifest.tensors}


def _run_dense(bundle: Bundle, ids: list[int], acc: _Acc, ctx: int) -> None:
    g = bundle.manifest.graph
    path, taps = _instrument(bundle.path(g.file), _linears(bundle))
    sess = open_session(path, pooled_options())
    kv = np.zeros((1, g.kv_num_heads, ctx, g.kv_head_dim), np.float32)              # an empty cache
    outs = list(taps)
    for w in _windows(ids, ctx):
        step = _step(w.shape[1])
        feeds = {g.input_ids: w, g.seqlens_k: step["seqlens_k"], g.total_sequence_length: step["total_sequence_length"],
                 g.logits_positions: np.array([w.shape[1] - 1], np.int64)}
        feeds.update({name: kv for name in g.past_keys + g.past_values})
        _add(acc, taps, dict(zip(outs, sess.run(outs, feeds))))


def _run_moe(bundle: Bundle, ids: list[int], acc: _Acc, ctx: int) -> None:
    """The staged pipeline of edge.moe.MoEDecoder.forward, one window at a time, with taps."""
    moe, g = bundle.manifest.moe, bundle.manifest.graph
    names = _linears(bundle)
    stages = []
    for st in moe.stages:
        path, taps = _instrument(bundle.path(st.file), names)
        stages.append((st, taps, open_session(path, pooled_options())))
    path, expert_taps = _instrument(bundle.path(moe.expert_graph), {EXPERT_PREFIX + "gate_up", EXPERT_PREFIX + "down"})
    # every fp32 expert resident when they fit a few GB, else a small cache (slower: they are rebuilt)
    resident = sum(e.size for e in moe.experts) < 4 << 30
    experts = ExpertCache(bundle, capacity=len(moe.experts) if resident else 2 * moe.num_experts, policy="lru")
    experts.graph_path = str(path)                                   # the same weights, with taps
    kv = np.zeros((1, g.kv_num_heads, ctx, g.kv_head_dim), np.float32)              # an empty cache
    eouts = [moe.expert_output] + list(expert_taps)
    expert_roles = {k: [t[len(EXPERT_PREFIX):] for t in v] for k, v in expert_taps.items()}  # "expert.down" -> "down"
    head = len(stages) - 1
    sparse = ["router_logits" in st.outputs for st, _, _ in stages[:-1]]
    moe_layer = [sum(sparse[:i]) for i in range(len(sparse))]          # the experts' numbering
    for w in _windows(ids, ctx):
        s = w.shape[1]
        hidden = residual = None
        for layer, (st, taps, sess) in enumerate(stages):
            feeds = dict(_step(s), past_key=kv, past_value=kv)              # by role
            feeds.update(input_ids=w) if layer == 0 else feeds.update(hidden=hidden, residual=residual)
            if layer == head:
                feeds["logits_positions"] = np.array([s - 1], np.int64)
            roles = [r for r in ("moe_in", "hidden", "residual", "router_logits", "moe_shared", "logits")
                     if r in st.outputs]
            outs = [st.outputs[r] for r in roles] + list(taps)
            res = dict(zip(outs, sess.run(outs, {st.inputs[r]: v for r, v in feeds.items() if r in st.inputs})))
            _add(acc, taps, res)
            if layer == head:
                break
            residual = res[st.outputs["residual"]]
            if not sparse[layer]:                                               # a dense layer's stage
                hidden = res[st.outputs["hidden"]]
                continue
            x, logits = res[st.outputs["moe_in"]][0], res[st.outputs["router_logits"]][0]    # [S, H], [S, E]
            top, wt = route(logits, moe.top_k, moe.normalize_topk)
            out = np.zeros_like(x)
            for e in np.unique(top):
                tok, slot = np.nonzero(top == e)
                y, *tapped = experts.get(moe_layer[layer], int(e)).run(eouts, {moe.expert_input: x[tok]})
                _add(acc, expert_roles, dict(zip(eouts[1:], tapped)), f"layers.{layer}.experts.{int(e)}.")
                np.add.at(out, tok, wt[tok, slot][:, None] * y)
            hidden = out[None]                                                  # [1, S, H]
            if "moe_shared" in st.outputs:
                hidden = hidden + res[st.outputs["moe_shared"]]
    experts.close()
