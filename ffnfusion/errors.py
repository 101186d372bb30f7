"""The one error type every stage raises for bad input; the CLI prints it as one line."""


class FFNFusionError(Exception):
    """A problem with the user's input: printed as one line, exit code 1."""


class UsageError(FFNFusionError):
    """A malformed command line or argument value: exit code 2."""
