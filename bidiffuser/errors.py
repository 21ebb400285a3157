"""User-facing errors: the CLIs print these as one line and exit with code 2."""


class BiDiffuserError(Exception):
    """Bad input from the user (missing file, wrong checkpoint, bad image, bad flag value)."""


class CheckpointError(BiDiffuserError):
    """A checkpoint file that cannot be read or does not match the model it is loaded into."""
