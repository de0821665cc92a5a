"""Library errors. Each carries the exit code the CLI maps it to (the only place that exits)."""


class PrivsynthError(Exception):
    """Base class; `exit_code` is what `privsynth` exits with."""

    exit_code = 1


class UsageError(PrivsynthError):
    """A bad flag, recipe key or value: fix the command line or the recipe."""

    exit_code = 2


class DataError(PrivsynthError):
    """The input folder cannot be read as an image dataset."""

    exit_code = 3


class BudgetError(PrivsynthError):
    """The privacy budget cannot pay for what was asked, or a privacy check failed."""

    exit_code = 4


class MissingResourceError(PrivsynthError):
    """A weights file or other resource is not on this machine (and cannot be downloaded)."""

    exit_code = 5


class VerificationError(PrivsynthError):
    """A certificate or dataset manifest does not match what it claims."""

    exit_code = 6
