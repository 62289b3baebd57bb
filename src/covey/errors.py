"""Errors a user can fix. The CLI prints their message (no traceback) and exits with code 2.

A message names what is wrong (file, line or record, field, flag) and how to fix it.
"""


class CoveyError(Exception):
    """Base class for problems with the user's input or settings."""


class DataError(CoveyError):
    """A data file or dataset id cannot be used as given."""


class ConfigError(CoveyError):
    """A flag or setting is out of range or contradicts another one."""
