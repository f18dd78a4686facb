"""The exceptions lorakit raises. Every one is a `LoraError`, so `except lk.LoraError` catches them all.

Messages say what was wrong (which module, which shape, which file) and what to do about it.
"""


class LoraError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LoraError, ValueError):
    """A configuration value is invalid (bad rank, unknown init, malformed adapter_config.json)."""


class TargetError(LoraError):
    """Target patterns matched nothing, or matched a module type lorakit cannot adapt."""


class AdapterNotFoundError(LoraError, KeyError):
    """An adapter name that the model does not have."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class AdapterFileError(LoraError):
    """An adapter file or directory is missing, truncated, corrupt or not an adapter at all."""


class ShapeMismatchError(LoraError):
    """An adapter does not fit the model: another architecture, another size, another base."""


class StateError(LoraError):
    """An operation that the current state forbids (routing to a merged adapter, merging while routing)."""


class MergeError(LoraError):
    """Merging failed, e.g. because the delta holds NaN or inf."""


class GraphError(LoraError, ValueError):
    """A training step that cannot be captured as a CUDA graph, or a batch that does not fit the captured one."""


class DiskFullError(LoraError):
    """A write failed because the disk (or the user's quota) is full."""
