"""The one exception meant for the user: bad input, a missing file, a config that does not fit.
The command line prints a UsageError as one line and exits 2; any other exception is a defect in
llmcxr-jax and keeps its traceback. UsageError is a ValueError, so library callers that catch
ValueError keep working."""
from __future__ import annotations


class UsageError(ValueError):
    """A message for the user that names the value, the reason and the fix."""


class MissingInputError(UsageError, FileNotFoundError):
    """A path the user gave (or must give) does not exist."""
