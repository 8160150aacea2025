"""The one exception type for errors a user can cause.

Bad files, bad configuration values, a missing model or an unreachable tracking server raise
`UserError`. Command-line entry points turn it into a single line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""
