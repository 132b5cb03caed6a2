"""edge: run open-weight LLMs on constrained devices.

    import edge
    model = edge.load("bundles/smollm2-int4")
    print(model.generate("The capital of France is", max_new_tokens=16))
"""
__version__ = "0.1.0"

from .errors import BudgetError, BundleError, ConfigError, ContextError, EdgeError, UnsupportedError  # noqa: E402
from .model import Model, load  # noqa: E402
from .sampling import SamplingParams  # noqa: E402

__all__ = ["load", "Model", "SamplingParams", "EdgeError", "BudgetError", "BundleError", "ConfigError", "ContextError",
           "UnsupportedError", "__version__"]
