"""EasyGen's user-facing error: a BiDiffuserError, so every CLI prints it as one line, exit code 2."""
from bidiffuser.errors import BiDiffuserError


class EasyGenError(BiDiffuserError):
    """Bad input to EasyGen (a message that cannot fit the context, a model that cannot load, ...)."""
