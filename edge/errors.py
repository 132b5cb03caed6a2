"""Errors a user can act on. Every message says what went wrong and what to do."""


class EdgeError(Exception):
    """Base class: the CLI prints these as one line (no traceback unless --debug)."""


class BundleError(EdgeError):
    """The bundle is missing, corrupt, truncated, unsafe or of another format version."""


class ConfigError(EdgeError, ValueError):
    """A config, manifest or argument has a wrong, missing or unknown field."""


class ContextError(EdgeError):
    """A prompt (plus the tokens to generate) does not fit the context window."""


class UnsupportedError(EdgeError):
    """An architecture or checkpoint feature edge does not support (yet)."""


class MissingTensorError(EdgeError):
    """A tensor the architecture asks for is not in the checkpoint (a reader may then try another layout)."""


class BudgetError(EdgeError):
    """The memory budget cannot hold the model: the message names the minimum that works."""


class StoreError(EdgeError):
    """The packed expert store could not be made or read (disk full, read-only place, damaged files)."""
