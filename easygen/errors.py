"""EasyGen's user-facing error: a BiDiffuserError, so every CLI prints it as one line, exit code 2."""
from bidiffuser.errors import BiDiffuserError


class EasyGenError(BiDiffuserError):
    """Bad input to EasyGen (a message that cannot fit the context, a model that cannot load, ...)."""


class LLMEngineError(EasyGenError):
    """The LLM engine (vLLM) failed on a request; ``status`` is the HTTP status a server answers
    with: 503 not reachable or too slow, 502 failed mid-answer, 400 refused the request."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
