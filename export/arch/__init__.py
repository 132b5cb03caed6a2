"""One module per architecture, named after the checkpoint's Hugging Face `model_type` and found by
lookup. Each turns a config.json into a `DecoderArch`: the normalised description and the
checkpoint's tensor names, with every quirk of that checkpoint family fixed there."""
from __future__ import annotations

import importlib
import pkgutil

from edge.errors import UnsupportedError

from .common import DecoderArch


def supported() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "common")


def lookup(model_type: str):
    """The architecture module for `model_type` (e.g. "llama")."""
    if not isinstance(model_type, str) or model_type == "common" or model_type not in supported():
        raise UnsupportedError(f"architecture {model_type!r} is not supported; "
                               f"supported model_types: {', '.join(supported())}")
    return importlib.import_module(f"{__name__}.{model_type}")


def describe(config: dict) -> DecoderArch:
    return lookup(config.get("model_type")).describe(config)
