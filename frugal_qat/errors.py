"""Errors that reach the user as one line: what is wrong, the value seen, and the fix.

The CLI catches :class:`FrugalQATError`, prints its message to stderr and exits 2
(``--debug`` shows the traceback). Anything else is a bug and keeps its traceback.
"""


class FrugalQATError(Exception):
    """Base class of every error meant for the user."""


class ConfigError(FrugalQATError):
    """A setting, a combination of settings or a recipe is invalid."""


class DataError(FrugalQATError):
    """Calibration or evaluation data is missing, unreadable or too short."""


class UnsupportedModel(FrugalQATError):
    """The checkpoint's architecture or shapes are not supported."""


class CorruptCheckpoint(FrugalQATError):
    """A model file or a run directory is missing pieces or is damaged."""


class ResumeMismatch(FrugalQATError):
    """An existing run directory was made with other settings, model or data."""


class RunInUse(FrugalQATError):
    """Another frugal-qat command is writing (or reading) the same run directory."""


class OutOfSpace(FrugalQATError):
    """Not enough disk (or memory) for the run."""


class TrainingDiverged(FrugalQATError):
    """A loss or a weight became NaN or Inf."""


class Interrupted(FrugalQATError):
    """The user stopped the run (SIGINT); it stopped at a safe point and can resume."""
