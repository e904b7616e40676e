"""Every error pocketgpt raises on purpose, under one base class.

A ``PocketGPTError``'s message names the bad value and the fix, so the command-line entry points
(``pocketgpt.cli``) print it as one ``error:`` line and exit with status 2 instead of a
traceback. Each subclass also derives from the builtin a caller would expect (``ValueError``
for bad input, ``RuntimeError`` for a failure while running).
"""

from __future__ import annotations


class PocketGPTError(Exception):
    """Base of pocketgpt's own errors: the message is a complete, one-line explanation."""


class ConfigError(PocketGPTError, ValueError):
    """A configuration value that cannot work; the message names the value and the fix."""


class SamplingError(ConfigError):
    """A sampling setting or prompt that cannot work; the message names the value and the fix."""


class DataError(PocketGPTError, ValueError):
    """A corpus that cannot be loaded: missing or unreadable files, empty splits, no network."""


class TokenizerError(PocketGPTError, ValueError):
    """A tokenizer file or setting that cannot be used; names the file and the problem."""


class CheckpointError(PocketGPTError, ValueError):
    """A checkpoint that is missing, corrupt, foreign or from another config."""


class ModelFileError(PocketGPTError, ValueError):
    """A model folder that is missing, truncated or not a GPTMini; names the file and the fix."""


class ModelURIError(PocketGPTError, ValueError):
    """A model URI that does not resolve; the message names the URI and the fix."""


class TrackingError(PocketGPTError, RuntimeError):
    """The tracking store cannot be reached or used; the message names the URI."""


class CompareError(PocketGPTError, ValueError):
    """Bad input to compare (unknown experiment, sweep, metric, model)."""


class NonFiniteLossError(PocketGPTError, RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last checkpoint."""


class ExportError(PocketGPTError, ValueError):
    """A model that cannot be exported as asked (a variant, a folder in the way, a format)."""


class EvaluationError(PocketGPTError, ValueError):
    """An evaluation that cannot run: an unknown task, lm-eval missing, an unusable file."""
