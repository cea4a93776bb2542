"""One family of exceptions for everything a user can get wrong.

The CLI catches :class:`LoratuneError` and prints its message without a traceback; anything
else is a bug in loratune and keeps its traceback.
"""


class LoratuneError(Exception):
    """Base class: a problem with the user's input, explained in the message."""


class CheckpointError(LoratuneError):
    """A model checkpoint is missing, corrupt, or of an architecture we do not support."""


class NonFiniteOutput(CheckpointError):
    """The model (with its adapter) computes NaN or Inf for this input: its weights are finite but overflow."""


class ConfigError(LoratuneError):
    """A configuration value (LoRA, recipe, CLI) is invalid."""


class TargetError(ConfigError):
    """A LoRA target name matches nothing in the model."""


class MergeError(LoratuneError):
    """Merging or unmerging an adapter is not possible in the current state."""


class DataError(LoratuneError):
    """Training data is missing, unreadable, empty, or lacks the fields the config names."""


class ResourceError(LoratuneError):
    """The machine lacks what the run needs: memory for a training step, or disk space to save it."""
