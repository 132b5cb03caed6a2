"""Checkpoint readers. Each gives the same thing: a Hugging Face style config dict, tensors by
Hugging Face name as fp32 numpy arrays (read one at a time, memory-mapped), and tokenizer assets.
FP8 checkpoints (DeepSeek-V3/R1: e4m3 weights with a `weight_scale_inv` per 128x128 block) are
dequantized here, one tensor at a time, so every later step sees fp32.

    open_source(path)  -> HFFolder | GGUFFile
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import ConfigError, EdgeError, MissingTensorError

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
              "F8_E4M3": np.uint8, "F8_E5M2": np.uint8}


def _fp8_table(exponent_bits: int, *, finite: bool) -> np.ndarray:
    """The fp32 value of each of the 256 bytes of an 8-bit float: 1 sign bit, `exponent_bits`
    exponent bits (bias 2^(e-1) - 1), the rest mantissa. e4m3 is the 'fn' variant (`finite`: no
    infinities, only S.1111.111 is NaN, max 448); e5m2 follows IEEE (inf and NaN at the top exponent)."""
    m_bits = 7 - exponent_bits
    b = np.arange(256)
    sign = np.where(b >> 7, -1.0, 1.0)
    e, m = (b >> m_bits) & ((1 << exponent_bits) - 1), b & ((1 << m_bits) - 1)
    bias = (1 << (exponent_bits - 1)) - 1
    value = np.where(e == 0, m / (1 << m_bits) * 2.0 ** (1 - bias),           # subnormals
                     (1 + m / (1 << m_bits)) * 2.0 ** (e - bias))
    top = e == (1 << exponent_bits) - 1
    if finite:
        value = np.where(top & (m == (1 << m_bits) - 1), np.nan, value)
    else:
        value = np.where(top, np.where(m == 0, np.inf, np.nan), value)
    return (sign * value).astype(np.float32)


_FP8 = {"F8_E4M3": _fp8_table(4, finite=True), "F8_E5M2": _fp8_table(5, finite=False)}


@dataclass(frozen=True)
class TokenizerAssets:
    tokenizer_json: str          # contents of tokenizer.json
    chat_template: str           # "" when none
    bos_token_id: int            # -1 when none
    eos_token_ids: tuple[int, ...]
    add_bos_token: bool


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    out = raw.astype(np.uint32)       # the one full-size temporary
    out <<= 16
    return out.view(np.float32)


class HFFolder:
    """A local Hugging Face model folder: config.json, *.safetensors (single or sharded)."""
    format = "hf-safetensors"

    def __init__(self, root: Path):
        self.root = root
        self.config = _read_json(root / "config.json")
        index = root / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(_read_json(index).get("weight_map", {}).values()))
        else:
            files = sorted(p.name for p in root.glob("*.safetensors"))
        if not files:
            raise EdgeError(f"{root} has no *.safetensors weights (pytorch .bin checkpoints are not read: "
                            "they are pickles; convert them to safetensors first)")
        self._where: dict[str, tuple[Path, dict]] = {}
        self.dtypes: set[str] = set()
        for f in files:
            path = root / f
            if not path.is_file():
                raise EdgeError(f"the checkpoint index names {f}, which is missing from {root}")
            header_len, header = _safetensors_header(path)
            size = path.stat().st_size
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if 8 + header_len + meta["data_offsets"][1] > size:
                    raise EdgeError(f"{path} is truncated: tensor {name} ends at byte "
                                    f"{8 + header_len + meta['data_offsets'][1]} but the file has {size}")
                self._where[name] = (path, dict(meta, base=8 + header_len))
                self.dtypes.add(meta["dtype"])

    @property
    def dtype(self) -> str:
        return "+".join(sorted(self.dtypes)).lower()

    def names(self) -> list[str]:
        return list(self._where)

    def num_parameters(self) -> int:
        return sum(int(np.prod(meta["shape"])) for _, meta in self._where.values())

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise MissingTensorError(f"tensor {name!r} is not in the checkpoint at {self.root} "
                            f"(is config.json's model_type {self.config.get('model_type')!r} right?)")
        a, dt = self._raw(name)
        if dt in _FP8:
            return self._dequantize_fp8(name, _FP8[dt][a])
        return bf16_to_f32(a) if dt == "BF16" else a.astype(np.float32)

    def _raw(self, name: str) -> tuple[np.ndarray, str]:
        """The tensor as stored (memory-mapped), and its safetensors dtype."""
        path, meta = self._where[name]
        dt = meta["dtype"]
        if dt not in _ST_DTYPES:
            raise EdgeError(f"tensor {name} has dtype {dt}; supported: {', '.join(_ST_DTYPES)}")
        b, e = meta["data_offsets"]
        raw = np.memmap(path, dtype=np.uint8, mode="r", offset=meta["base"] + b, shape=(e - b,))
        return raw.view(_ST_DTYPES[dt]).reshape(meta["shape"]), dt

    def _dequantize_fp8(self, name: str, w: np.ndarray) -> np.ndarray:
        """Block-scaled FP8: each (rows x cols) block of the last two axes is multiplied by its entry
        of `<name>_scale_inv` (shape [..., ceil(out/rows), ceil(in/cols)]; the name is DeepSeek's,
        the stored value multiplies). Scaled one row block at a time: no second full-size array."""
        scale_name = name + "_scale_inv"
        if scale_name not in self._where:
            raise EdgeError(f"FP8 tensor {name} has no {scale_name} in {self.root}: edge reads block-scaled FP8 "
                            "checkpoints as DeepSeek publishes them (weight and weight_scale_inv)")
        qc = self.config.get("quantization_config") or {}
        rows, cols = qc.get("weight_block_size") or (128, 128)
        scale = self.get(scale_name)
        want = w.shape[:-2] + (-(-w.shape[-2] // rows), -(-w.shape[-1] // cols))
        if w.ndim < 2 or scale.shape != want:
            raise EdgeError(f"{scale_name} has shape {list(scale.shape)}; weight {list(w.shape)} in "
                            f"{rows}x{cols} blocks needs {list(want)}")
        for r in range(want[-2]):
            block_rows = w[..., r * rows:(r + 1) * rows, :]
            block_rows *= np.repeat(scale[..., r, :], cols, axis=-1)[..., None, :w.shape[-1]]
        return w

    def tokenizer(self) -> TokenizerAssets:
        tok = self.root / "tokenizer.json"
        if not tok.is_file():
            raise EdgeError(f"{self.root} has no tokenizer.json (the fast tokenizer file) - edge needs it")
        tcfg = _read_json(self.root / "tokenizer_config.json") if (self.root / "tokenizer_config.json").is_file() else {}
        gen = self.generation_config()
        template = ""
        if (self.root / "chat_template.jinja").is_file():
            template = (self.root / "chat_template.jinja").read_text()
        elif isinstance(tcfg.get("chat_template"), str):
            template = tcfg["chat_template"]
        tok_text = tok.read_text()
        vocab = _token_ids(tok_text)

        def token_id(v):
            if isinstance(v, dict):
                v = v.get("content")
            return vocab.get(v, -1) if isinstance(v, str) else -1

        eos = gen.get("eos_token_id", self.config.get("eos_token_id"))
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        tok_eos = token_id(tcfg.get("eos_token"))
        if tok_eos >= 0 and tok_eos not in eos_ids:
            eos_ids.append(tok_eos)   # chat models end turns with the tokenizer's eos (e.g. <|im_end|>)
        bos = gen.get("bos_token_id", self.config.get("bos_token_id"))
        return TokenizerAssets(tok_text, template, bos if isinstance(bos, int) else -1, tuple(eos_ids),
                               bool(tcfg.get("add_bos_token", False)))

    def generation_config(self) -> dict:
        p = self.root / "generation_config.json"
        return _read_json(p) if p.is_file() else {}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgeError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return data


def _safetensors_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise EdgeError(f"{path} is truncated (no safetensors header)")
        n = struct.unpack("<Q", head)[0]
        if n > 100_000_000:
            raise EdgeError(f"{path} is not a safetensors file (header length {n})")
        try:
            return n, json.loads(f.read(n))
        except json.JSONDecodeError:
            raise EdgeError(f"{path} has a corrupt safetensors header") from None


def _token_ids(tokenizer_json: str) -> dict[str, int]:
    t = json.loads(tokenizer_json)
    ids = dict(t.get("model", {}).get("vocab", {})) if isinstance(t.get("model", {}).get("vocab"), dict) else {}
    for a in t.get("added_tokens", []):
        ids[a["content"]] = a["id"]
    return ids


def open_source(src: str) -> "HFFolder":
    from .gguf_source import GGUFFile
    p = Path(src).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise EdgeError(f"{p} has no config.json: not a Hugging Face model folder")
        return HFFolder(p)
    if p.is_file() and p.suffix == ".gguf":
        return GGUFFile(p)
    if p.is_file():
        raise EdgeError(f"{p} is neither a Hugging Face model folder nor a .gguf file")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", src):
        return _from_hub(src)
    raise EdgeError(f"{src} does not exist")


def _from_hub(repo_id: str) -> HFFolder:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise EdgeError(f"{repo_id!r} is not a local path; to fetch it from the Hugging Face hub install "
                        "huggingface_hub (pip install huggingface_hub), or pass a local folder") from None
    try:
        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"])
    except Exception as e:  # network errors come in many types; report them in one line
        raise EdgeError(f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); download it elsewhere and pass the local folder") from None
    return HFFolder(Path(path))
