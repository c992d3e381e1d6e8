"""The one exception type for mistakes a user can fix (bad option, bad file, wrong checkpoint).

The CLIs turn it into a single line on stderr and exit code 2; anything else is a bug and
keeps its traceback.
"""


class HgkdError(Exception):
    """A user-facing error: the message names the file/option and says what to do."""
