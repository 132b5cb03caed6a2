"""edge: run open-weight LLMs on constrained devices.

    import edge
    model = edge.load("bundles/smollm2-int4")
    print(model.generate("The capital of France is", max_new_tokens=16))
"""
__version__ = "0.1.0"

from .errors import (BudgetError, BundleError, ConfigError, ContextError, EdgeError, StoreError,  # noqa: E402
                     UnsupportedError)
from .model import Model, load, prepare  # noqa: E402
from .moe import process_budget  # noqa: E402
from .sampling import SamplingParams  # noqa: E402

__all__ = ["load", "prepare", "process_budget", "Model", "SamplingParams", "EdgeError", "BudgetError", "BundleError",
           "ConfigError", "ContextError", "StoreError", "UnsupportedError", "__version__"]
