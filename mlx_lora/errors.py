"""The exceptions the CLI turns into a message and a non-zero exit, never a traceback."""


class UserError(Exception):
    """Bad input the user can fix: the message names the file, line or key and what to do."""


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint; the message says how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM
