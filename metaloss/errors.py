"""Errors that mean "the user's input is wrong", as opposed to a bug.

Scripts catch these (and only these) and turn them into one line on stderr and
a non-zero exit, before any training starts.
"""


class ConfigError(ValueError):
    """An invalid value in a configuration or a constructor argument."""


class DataNotFoundError(ConfigError):
    """A dataset's files are missing: says which files, where, and which key sets the root."""
