"""Errors a user can cause. Each carries a one-line message that says what to do, and an exit code.

The CLI prints ``error: <message>`` and exits with the code; it never shows a traceback for these.
"""


class PerfkitError(Exception):
    """A problem the user can fix; the message names the fix."""

    exit_code = 1


class ConfigError(PerfkitError):
    """An invalid configuration or command line (click's usage-error code)."""

    exit_code = 2


class RunDirError(PerfkitError):
    """A run directory that cannot be read: missing, unfinished or written by a newer perfkit."""

    exit_code = 1
