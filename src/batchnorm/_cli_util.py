"""Shared bits of the command line (private)."""


class CliError(Exception):
    """A user error on the command line: printed as one line, exit status 2."""
