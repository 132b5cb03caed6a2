"""`edge export`: a Hugging Face folder or GGUF file -> a self-describing edge bundle.

Streams tensor by tensor (each weight is read, quantized, written and dropped), writes into a
temporary folder next to the destination and renames it into place only when complete.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edge import __version__
from edge.errors import ConfigError, EdgeError, UnsupportedError
from edge.manifest import FORMAT_VERSION, MANIFEST_NAME, FileEntry, GenerationDefaults, Manifest, SourceInfo, TokenizerSpec

from .arch import describe
from .decoder import QuantPolicy, build_decoder
from .moe import build_moe
from .onnx_graph import DataFile, Graph
from .quant import QuantScheme
from .sources import open_source

QUANTS = ("fp32", "int8", "int4")
VIAS = ("auto", "edge", "optimum")
# int8's loss is mostly onnxruntime's int8 activation quantization, done per weight block: block 16
# halves it (SmolLM2: +0.47% perplexity vs +0.68% at block 32)
DEFAULT_BLOCK = {"int8": 16, "int4": 32}
MOE_EXPERT_BLOCK = 64      # an int4 MoE's experts, where it divides both depths (ExportOptions.policy)


POLICY_KEYS = ("attention", "attention_qkv", "mlp", "mlp_down", "experts", "experts_down", "down", "embed", "lm_head")


@dataclass(frozen=True)
class ExportOptions:
    quant: str = "int4"              # scheme of the transformer's linear layers
    block_size: int = 0              # 0: DEFAULT_BLOCK of `quant` (an int4 export's int8 embedding: 32)
    symmetric: bool = True
    method: str = "mse"              # mse | gptq | rtn (export/quant.py). SmolLM2 perplexity vs fp32: int4 +17.6%
                                     #   with mse vs +22.2% with rtn, +6.5% with gptq (needs calib); int8
                                     #   +0.39% vs +0.47%
    embed_quant: str = "auto"        # fp32 | int8 | int4 | auto: fp32 for fp32 exports, else int8 (only the
                                     #   gathered rows are ever read, so int8 costs disk, not speed or RSS)
    lm_head_quant: str = "auto"      # fp32 | int8 | int4 | auto: with tied embeddings as the embedding (its
                                     #   bytes are stored once); else as the linear layers (read every token)
    quant_policy: str = ""           # overrides per kind of weight: "attention=int8,down=int8,experts=int4/64"
    max_context: int = 0             # 0: the model's max_position_embeddings
    calib: str = ""                  # a text file: weigh mse's search by each input channel's mean x² on it
                                     #   (export/calib.py). SmolLM2 int4: +8.6% perplexity vs +17.6% without;
                                     #   gptq (which needs it) uses the inputs' X^T X
    calib_tokens: int = 16384        # how much of the calibration text to run
    via: str = "auto"                # auto: edge's own graphs where export/arch/ has the model_type, else
                                     #   optimum's (export/optimum_export.py); "edge" or "optimum" to choose
    task: str = ""                   # optimum: text-generation, feature-extraction or
                                     #   automatic-speech-recognition ("": from the checkpoint's head)

    def policy(self, *, tied: bool = False, moe_depths: tuple[int, int] | None = None) -> QuantPolicy:
        """Schemes per kind of weight. `moe_depths`: an MoE's (hidden, expert FFN) sizes.

        An int4 MoE keeps all of attention in int8 (q|k|v one fused matrix, and o) and its experts in
        int4 at block 64 where 64 divides both depths (QMoE takes one block size for both matmuls).
        Decode of an int4 MoE reads its bytes from RAM every token, and onnxruntime's packed int4 layout
        adds an fp32 scale and an fp32 block sum per block: 0.75 bytes a weight at block 32, 0.625 at
        64, so block 64 makes the experts (most of what a token reads) 17% lighter (SmolMoE: 1.56 MB
        per cached expert instead of 1.91). SmolMoE, 20k held-out tokens, perplexity over fp32: +11.0%
        at 4.59 bits/weight, against +10.0% at 4.77 with experts at block 32 and o in int4 (the previous
        default) and llama.cpp Q4_0's +11.2% at 4.71; experts at block 64 with o in int4: +12.0%.
        Decode against the previous default: 1.06-1.10x (medians of per-round ratios,
        tests/bench/compare_dense.py and tests/bench/lockstep.py). `attention_qkv=int4` is faster and
        worse (+18.0% in the README's table)."""
        def scheme(q: str) -> QuantScheme | None:
            q, _, bs = q.partition("/")
            if q not in QUANTS:
                raise ConfigError(f"unknown quantization {q!r}; choose one of {', '.join(QUANTS)}")
            if bs and not bs.isdigit():
                raise ConfigError(f"block size in {q}/{bs} must be a number")
            if q == "fp32":
                return None
            return QuantScheme(int(q[3:]), int(bs or self.block_size or DEFAULT_BLOCK.get(self.quant, 32)), self.symmetric,
                               self.method)
        embed = ("fp32" if self.quant == "fp32" else "int8") if self.embed_quant == "auto" else self.embed_quant
        head = (embed if tied else self.quant) if self.lm_head_quant == "auto" else self.lm_head_quant
        kinds = dict(attention=self.quant, mlp=self.quant, experts=self.quant, embed=embed, lm_head=head)
        if moe_depths is not None and self.quant == "int4":
            kinds["attention"] = "int8"
            if not self.block_size and all(d % MOE_EXPERT_BLOCK == 0 for d in moe_depths):
                kinds["experts"] = f"int4/{MOE_EXPERT_BLOCK}"
        over = {}
        for item in filter(None, (x.strip() for x in self.quant_policy.split(","))):
            key, eq, value = item.partition("=")
            if not eq or key.strip() not in POLICY_KEYS:
                raise ConfigError(f"--quant-policy item {item!r}: expected KIND=QUANT with KIND one of "
                                  f"{', '.join(POLICY_KEYS)}")
            over[key.strip()] = value.strip()
        kinds.update({k: v for k, v in over.items() if k not in ("down", "mlp_down", "experts_down", "attention_qkv")})
        kinds["attention_qkv"] = over.get("attention_qkv", kinds["attention"])
        kinds["mlp_down"] = over.get("mlp_down", over.get("down", kinds["mlp"]))
        kinds["experts_down"] = over.get("experts_down", over.get("down", kinds["experts"]))
        return QuantPolicy(**{k: scheme(v) for k, v in kinds.items()})


@dataclass(frozen=True)
class ExportReport:
    out: Path
    seconds: float
    peak_rss_mb: float
    bundle_mb: float
    manifest: Manifest


def _generation_defaults(gen: dict) -> GenerationDefaults:
    sample = bool(gen.get("do_sample", False))
    return GenerationDefaults(temperature=float(gen.get("temperature", 1.0)) if sample else 0.0,
                              top_k=int(gen.get("top_k", 0) or 0) if sample else 0,
                              top_p=float(gen.get("top_p", 1.0) or 1.0) if sample else 1.0,
                              repetition_penalty=float(gen.get("repetition_penalty", 1.0) or 1.0))


def _file_entry(root: Path, name: str) -> FileEntry:
    h = hashlib.sha256()
    with open(root / name, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return FileEntry(path=name, size=(root / name).stat().st_size, sha256=h.hexdigest())


def export_model(src: str, out: str | os.PathLike, options: ExportOptions = ExportOptions(), *,
                 force: bool = False, progress: bool = True) -> ExportReport:
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not force:
        raise EdgeError(f"{out} already exists; pass --force to replace it")
    options.policy()                      # bad options fail before the source is opened
    if options.calib and options.method == "rtn":
        raise ConfigError("--calib informs the mse and gptq methods: it needs --method mse or gptq")
    if options.method == "gptq" and not options.calib:
        raise ConfigError("--method gptq needs a calibration text: give it --calib FILE")
    source = open_source(src)
    if options.via not in VIAS:
        raise ConfigError(f"unknown --via {options.via!r}; choose one of {', '.join(VIAS)}")
    from .arch import supported
    optimum = options.via == "optimum" or (options.via == "auto" and source.config.get("model_type") not in supported())
    if optimum:
        if source.format != "hf-safetensors":
            raise UnsupportedError(f"{source.config.get('model_type')!r} from {source.format} is not supported: "
                                   "optimum exports Hugging Face folders; edge's own architectures are "
                                   + ", ".join(supported()))
        if options.calib or options.quant_policy or options.method == "gptq":
            raise ConfigError("--calib, --method gptq and --quant-policy apply to edge's own architectures, "
                              "not optimum's graphs")
        from .optimum_export import task_of
        task = options.task or task_of(source.config)
        arch = None
    else:
        if options.task not in ("", "text-generation"):
            raise ConfigError(f"edge's own {source.config.get('model_type')} export is text generation; "
                              "other tasks go through --via optimum")
        task = "text-generation"
        arch = describe(source.config)
    if arch is not None:
        depths = (arch.spec.hidden_size, arch.moe.expert_intermediate_size) if arch.moe is not None else None
        policy = options.policy(tied=arch.spec.tie_word_embeddings, moe_depths=depths)
        max_ctx = min(arch.spec.max_context, options.max_context or arch.spec.max_context)
    assets = source.tokenizer()
    calibration = None
    if options.calib:
        from .calib import collect
        out.parent.mkdir(parents=True, exist_ok=True)
        calibration = collect(src, options.calib, max_tokens=options.calib_tokens, gram=options.method == "gptq",
                              workdir=out.parent)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        moe, sections = None, {}
        if optimum:
            from .optimum_export import build_with_optimum, max_positions, model_spec
            bar = _progress(2 if task == "automatic-speech-recognition" else 1, progress, unit="graph")
            policy = options.policy(tied=bool(source.config.get("tie_word_embeddings", True)))
            built = build_with_optimum(source.root, tmp, policy.attention, embedding=policy.embed, head=policy.lm_head,
                                       task=task, config=source.config, gen=source.generation_config(),
                                       progress=lambda done, total: bar.update(1))
            graph, tensors, files = built.get("graph"), built["tensors"], built["files"]
            sections = {k: built[k] for k in ("embedding", "speech") if k in built}
            max_ctx = min(max_positions(source.config), options.max_context or max_positions(source.config))
            n_params = source.num_parameters()          # the checkpoint's (the graphs may hold a tied head twice)
            base = model_spec(source.config, num_parameters=n_params, max_context=max_ctx)
        elif arch.moe:
            bar = _progress(arch.spec.num_layers, progress)
            graph, moe, tensors, n_params, files = build_moe(tmp, arch, source.get, policy, max_context=max_ctx,
                                                             calibration=calibration and calibration.stats,
                                                             progress=lambda s: bar.update(1))
        else:
            bar = _progress(arch.spec.num_layers, progress)
            data = DataFile(tmp / "model.onnx.data")
            g = Graph(data)
            graph, tensors, n_params = build_decoder(g, arch, source.get, policy, max_context=max_ctx,
                                                     calibration=calibration and calibration.stats,
                                                     progress=lambda s: bar.update(1))
            data.close()
            g.save(tmp / "model.onnx")
            files = ["model.onnx", "model.onnx.data"]
        bar.close()
        (tmp / "tokenizer.json").write_text(assets.tokenizer_json)
        files.append("tokenizer.json")
        if assets.chat_template:
            (tmp / "chat_template.jinja").write_text(assets.chat_template)
            files.append("chat_template.jinja")
        spec = dataclasses.replace(base if optimum else arch.spec, max_context=max_ctx, num_parameters=n_params)
        manifest = Manifest(
            format_version=FORMAT_VERSION, producer=f"edge {__version__}", quant=options.quant, model=spec, graph=graph,
            tokenizer=TokenizerSpec(file="tokenizer.json", chat_template="chat_template.jinja" if assets.chat_template else "",
                                    bos_token_id=assets.bos_token_id, eos_token_ids=assets.eos_token_ids,
                                    add_bos_token=assets.add_bos_token),
            generation=_generation_defaults(source.generation_config()),
            source=SourceInfo(path=str(src), format=source.format, dtype=source.dtype,
                              calibration=calibration.describe(options.calib) if calibration else ""),
            tensors=tuple(tensors), files=tuple(_file_entry(tmp, f) for f in files), moe=moe, task=task, **sections)
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        _fsync_dir(tmp)
        if out.exists():   # --force: move the old bundle aside only once the new one is complete
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == 28:
            raise EdgeError(f"disk full while writing {out}: nothing was written; free space and retry") from None
        raise
    finally:
        if calibration is not None:
            calibration.close()
    size = sum(f.size for f in manifest.files) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return ExportReport(out=out, seconds=time.perf_counter() - t0, peak_rss_mb=peak, bundle_mb=size, manifest=manifest)


def _fsync_dir(path: Path) -> None:
    for p in path.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def _progress(total: int, enabled: bool, unit: str = "layer"):
    """A bar on a terminal; piped, a plain line every quarter of the layers, so a log shows progress."""
    from tqdm import tqdm
    if not enabled or sys.stderr.isatty():
        return tqdm(total=total, desc="export", unit=unit, disable=not enabled, file=sys.stderr)
    return _Lines(total, unit)


class _Lines:
    def __init__(self, total: int, unit: str):
        self.total, self.done, self.t0, self.unit = total, 0, time.perf_counter(), unit

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.done == self.total or self.done % max(1, self.total // 4) == 0:
            print(f"export: {self.done}/{self.total} {self.unit}s, {time.perf_counter() - self.t0:.0f} s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        pass
