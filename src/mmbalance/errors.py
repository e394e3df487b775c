"""User-facing errors.

Anything a user can cause (a bad name, a missing file, a wrong value) raises
``MMBalanceError`` with a one-line message that says what is wrong and what is
allowed. The CLI prints that line and exits with status 2; it never shows a
traceback for these unless ``--debug`` is given.
"""


class MMBalanceError(Exception):
    """A problem with the user's input, reported as one line."""


class ConfigError(MMBalanceError):
    """An unknown config key or an invalid value."""


class DataError(MMBalanceError):
    """A missing, corrupt or inconsistent dataset."""


class UnknownNameError(MMBalanceError):
    """A registry lookup for a name that is not registered."""


class NonFiniteLossError(MMBalanceError):
    """Training produced a NaN or infinite loss."""
