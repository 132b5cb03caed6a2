"""Calibration: the statistics of every linear layer's input on a text. The mse search weighs input
channels by their mean x² (the idea of llama.cpp's importance matrix); gptq needs the whole second
moment X^T X to carry each column's rounding error into the columns not yet quantized.

    source ─► fp32 bundle (a temporary folder, context = one window)
           ─► every graph gets one more output per linear: its input x [.., K]
           ─► the text runs through in disjoint windows
           ─► stats[name] = tokens n, sum of x² [K], and with gram=True X^T X [K, K] (fp32)

An MoE's stages and experts run as the runtime's staged pipeline does (route, then each expert on
the tokens routed to it), so an expert's importance averages only over its own tokens; an expert
the text never reaches gets none (plain weighted search). They run stage-major, on demand: the
export asks for layer i's statistics, every window goes through stage i, and only then layer i+1
(one layer's experts and grams in memory, not the whole model's). Names are the manifest's tensor names
("layers.3.qkv", "layers.3.experts.5.down", "lm_head").
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edge.bundle import Bundle, open_bundle
from edge.engine import default_threads, open_session, pooled_options, use_global_pool
from edge.errors import ConfigError
from edge.experts import ExpertCache
from edge.prefetch import load_routers
from edge.routing import route
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
    stats: Mapping[str, Activations]     # tensor name -> its input's statistics (an MoE's: streamed, _Streamed)
    tokens: int
    text_sha256: str

    def close(self) -> None:
        """Stop an MoE's stream and remove its temporary fp32 bundle (a dense model's is gone already)."""
        if isinstance(self.stats, _Streamed):
            self.stats.close()

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
    tokens); `gram` adds X^T X. An MoE's are computed a layer at a time as they are asked for, with
    one layer's grams held at a time (SmolMoE holds 2.6 GB of them in all): close() the result when
    done with it (the temporary fp32 bundle lives until then)."""
    from . import ExportOptions, export_model         # a calibration is a small fp32 export run on the text

    try:
        text = Path(text_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--calib {text_path}: cannot read it as UTF-8 text ({e})") from None
    tmp = Path(tempfile.mkdtemp(prefix=".edge-calib-", dir=workdir))
    streamed = False
    try:
        rep = export_model(src, tmp / "fp32", ExportOptions(quant="fp32", max_context=CONTEXT), progress=False)
        bundle = open_bundle(rep.out)
        m = bundle.manifest
        ids = Text(m.tokenizer, bundle.path(m.tokenizer.file), None).encode(text)[:max_tokens]
        ctx = m.model.max_context                            # CONTEXT, or less for a model with a short one
        if len(ids) < ctx // 4:
            raise ConfigError(f"--calib {text_path}: only {len(ids)} tokens; give it at least {ctx // 4}")
        use_global_pool(threads or default_threads())
        digest = hashlib.sha256(text.encode()).hexdigest()
        if m.moe:
            stats = _Streamed(_moe_stages(bundle, ids, gram, ctx), len(m.moe.stages), gram,
                              lambda: shutil.rmtree(tmp, ignore_errors=True))
            streamed = True
            return Calibration(stats, len(ids), digest)
        acc = _Acc(gram)
        _run_dense(bundle, ids, acc, ctx)
        return Calibration(acc.result(), len(ids), digest)
    finally:
        if not streamed:
            shutil.rmtree(tmp, ignore_errors=True)


def _windows(ids: list[int], ctx: int):
    for i in range(0, len(ids), ctx):
        yield np.asarray(ids[i:i + ctx], np.int64)[None]                        # [1, S]


def _step(s: int) -> dict[str, np.ndarray]:
    return {"seqlens_k": np.array([s - 1], np.int32), "total_sequence_length": np.array(s, np.int32)}


def _linears(bundle: Bundle) -> set[str]:
    return {t.name for t in bundle.manifest.tensors}


def _empty_cache(g, indices, ctx: int) -> dict[str, np.ndarray]:
    """Inputs for an empty attention cache (each window starts from none): the whole buffer where
    the graph writes in place, no tokens where it appends."""
    return {g.cache[i].input: np.zeros(g.cache[i].at(ctx if g.cache[i].update == "in_place" else 0), np.float32)
            for i in indices}


def _run_dense(bundle: Bundle, ids: list[int], acc: _Acc, ctx: int) -> None:
    g = bundle.manifest.graph
    path, taps = _instrument(bundle.path(g.file), _linears(bundle))
    sess = open_session(path, pooled_options())
    kv = _empty_cache(g, range(len(g.cache)), ctx)
    outs = list(taps)
    for w in _windows(ids, ctx):
        step = _step(w.shape[1])
        feeds = {g.input_ids: w, g.seqlens_k: step["seqlens_k"], g.total_sequence_length: step["total_sequence_length"],
                 g.logits_positions: np.array([w.shape[1] - 1], np.int64)}
        feeds.update(kv)
        _add(acc, taps, dict(zip(outs, sess.run(outs, feeds))))


def _moe_stages(bundle: Bundle, ids: list[int], gram: bool, ctx: int) -> Iterator[dict[str, Activations]]:
    """The staged pipeline of edge.moe.MoEDecoder.forward with taps, stage-major: every window goes
    through stage i (and its experts) before any goes on to stage i+1, each window's hidden state
    and residual kept in between. Yields each stage's statistics when it is done, so only one
    layer's experts and grams are held at a time."""
    moe, g = bundle.manifest.moe, bundle.manifest.graph
    names = _linears(bundle)
    expert_path, expert_taps = _instrument(bundle.path(moe.expert_graph), {EXPERT_PREFIX + "gate_up", EXPERT_PREFIX + "down"})
    eouts = [moe.expert_output] + list(expert_taps)
    expert_roles = {k: [t[len(EXPERT_PREFIX):] for t in v] for k, v in expert_taps.items()}  # "expert.down" -> "down"
    head = len(moe.stages) - 1
    windows = list(_windows(ids, ctx))
    state: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(windows)     # (hidden, residual) per window
    moe_layer = moe.moe_layers() + [None]                                          # the head has no experts
    for layer, st in enumerate(moe.stages):
        path, taps = _instrument(bundle.path(st.file), names)
        sess = open_session(path, pooled_options())
        sparse = moe_layer[layer] is not None
        experts = ExpertCache(bundle, capacity=moe.num_experts, policy="lru") if sparse else None
        if experts:
            experts.graph_path = str(expert_path)                                  # the same weights, with taps
        acc = _Acc(gram)
        kv = _empty_cache(g, st.cache, ctx)
        biases = load_routers(bundle.path(moe.router_file), moe.router_biases, 1, moe.num_experts) \
            if moe.routing.bias else None
        for i, w in enumerate(windows):
            s = w.shape[1]
            feeds = _step(s)                                                        # by role
            if layer == 0:
                feeds["input_ids"] = w
            else:
                feeds["hidden"], feeds["residual"] = state[i]
            if layer == head:
                feeds["logits_positions"] = np.array([s - 1], np.int64)
            roles = [r for r in ("moe_in", "hidden", "residual", "router_logits", "moe_shared", "logits")
                     if r in st.outputs]
            outs = [st.outputs[r] for r in roles] + list(taps)
            res = dict(zip(outs, sess.run(outs, {**{st.inputs[r]: v for r, v in feeds.items() if r in st.inputs}, **kv})))
            _add(acc, taps, res)
            if layer == head:
                continue
            residual = res[st.outputs["residual"]]
            if not sparse:                                                          # a dense layer's stage
                state[i] = (res[st.outputs["hidden"]], residual)
                continue
            x, logits = res[st.outputs["moe_in"]][0], res[st.outputs["router_logits"]][0]    # [S, H], [S, E]
            top, wt = route(logits, moe.routing, biases[moe_layer[layer]][0] if biases else None)
            out = np.zeros_like(x)
            for e in np.unique(top):
                tok, slot = np.nonzero(top == e)
                y, *tapped = experts.get(moe_layer[layer], int(e)).run(eouts, {moe.expert_input: x[tok]})
                _add(acc, expert_roles, dict(zip(eouts[1:], tapped)), f"layers.{layer}.experts.{int(e)}.")
                np.add.at(out, tok, wt[tok, slot][:, None] * y)
            hidden = out[None]                                                      # [1, S, H]
            if "moe_shared" in st.outputs:
                hidden = hidden + res[st.outputs["moe_shared"]]
            state[i] = (hidden, residual)
        if experts:
            experts.close()
        del sess
        yield acc.result()


class _Streamed(Mapping):
    """An MoE's statistics, computed a stage at a time as they are asked for (the export asks for them
    layer by layer): asking for layer i's runs the stages up to i. With grams, computing a stage
    drops the grams of the stages before it (SmolMoE: ~86 MB a layer instead of 2.6 GB held), and
    asking for one of those again is an error rather than a silent fallback to no gram."""

    def __init__(self, stages: Iterator[dict[str, Activations]], n_stages: int, grams: bool, on_close):
        self._stages, self._n, self._grams, self._on_close = stages, n_stages, grams, on_close
        self._stats: dict[str, Activations] = {}
        self._last: dict[str, Activations] = {}    # the stage computed last (the one whose grams are kept)
        self._done = 0                             # stages computed

    def _stage_of(self, name: str) -> int:
        m = re.match(r"layers\.(\d+)\.", name)
        return int(m.group(1)) if m else self._n - 1          # the head's (lm_head)

    def _upto(self, stage: int) -> None:
        while self._done <= stage:
            if self._grams:
                self._stats.update({k: dataclasses.replace(a, gram=None) for k, a in self._last.items()})
            self._last = next(self._stages)
            self._stats.update(self._last)
            self._done += 1
            if self._done == self._n:
                self.close()

    def __getitem__(self, name: str) -> Activations:
        stage = self._stage_of(name)
        self._upto(stage)
        if self._grams and stage < self._done - 1 and name in self._stats:
            raise RuntimeError(f"calibration of {name} was asked for after a later layer's: the grams stream "
                               "layer by layer and those of earlier layers are gone")
        return self._stats[name]

    def __iter__(self):
        self._upto(self._n - 1)
        return iter(self._stats)

    def __len__(self) -> int:
        self._upto(self._n - 1)
        return len(self._stats)

    def close(self) -> None:
        if self._on_close is not None:
            self._stages.close()
            self._on_close()
            self._on_close = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: modules may be gone already
            pass
