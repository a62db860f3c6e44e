"""The one exception type for failures a user can cause and fix."""


class DFlashLabError(Exception):
    """Bad input, a mismatch, or a missing resource. The message names the input and the fix.

    The CLI prints it as one `error: ...` line and exits with status 2, with no traceback.
    """
