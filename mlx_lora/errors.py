"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input the user can fix: the message names the file, line or key and what to do."""
