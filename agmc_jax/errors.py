"""Typed errors: every user mistake raises a subclass of `AgmcError` with a one-line message."""


class AgmcError(Exception):
    """Base class: the command line prints the message and exits with status 2."""


class UnknownModelError(AgmcError, KeyError):
    """A model name that the zoo does not know."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class UnknownDatasetError(AgmcError, KeyError):
    """A dataset name that the data module does not know."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class DataNotFoundError(AgmcError, FileNotFoundError):
    """The files a dataset is read from are missing."""


class CheckpointError(AgmcError):
    """A checkpoint that is missing, corrupt, or belongs to another network."""


class InputShapeError(AgmcError, ValueError):
    """An input shape the network cannot take."""


class TraceError(AgmcError, ValueError):
    """A module whose `apply` cannot be traced or analysed."""


class MaskError(AgmcError, ValueError):
    """A keep ratio or mask that does not fit the traced network."""


class BudgetError(AgmcError, ValueError):
    """A budget outside (0, 1) or below what the smallest allowed policy reaches, or settings that cannot run."""


class QuantizationError(AgmcError, ValueError):
    """Bit widths outside 1..16, or given for leaves that are not kernels of the network."""


class DataError(AgmcError, ValueError):
    """Labelled arrays a network cannot be scored on: labels of the wrong shape, length, type or range."""


class CheckpointWarning(UserWarning):
    """A checkpoint that could not be read and was passed over (a resume goes back to an older one)."""


class AdmmError(AgmcError, ValueError):
    """ADMM or AutoCompress settings that cannot run: rho or its growth not positive, an unknown structure."""


class UsageError(AgmcError, ValueError):
    """An option that does not apply to what it is given for (e.g. --width for a model without a width multiplier)."""
