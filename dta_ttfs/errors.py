"""The project's user-facing error: bad input that the user can fix.

The CLI prints a ``UserError`` as one line (``error: ...``) and exits with status 2,
without a traceback. Messages say what is wrong and how to fix it.
"""


class UserError(ValueError):
    """Bad input (config, file, data) with a message that says how to fix it."""
