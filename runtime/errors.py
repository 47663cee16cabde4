"""The one exception type for mistakes in what a user gave us (files, names, shapes, flags).

Command-line entry points print it as a single line and exit 2; anything else that escapes is a bug.
"""


class UserError(Exception):
    """A problem with the user's input, stated in one line that says what to do about it."""
