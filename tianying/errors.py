"""User-facing errors: the CLI prints these as one line on stderr, never as a traceback."""


class TianyingError(Exception):
    """Bad input from the user (missing file, unknown name, corrupt or mismatched checkpoint)."""
