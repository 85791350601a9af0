"""Typed errors: the library raises them, only the CLI prints them."""

from contextlib import contextmanager


class LmcliError(Exception):
    """An error with a message for the user and an optional hint."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class LmcliWarning(UserWarning):
    """Something the user should know that is not an error (the CLI prints it as one `note:` line)."""


class TokenizerError(LmcliError):
    """The tokenizer cannot be built or used."""


class TemplateError(LmcliError):
    """A chat template cannot be rendered."""


class ModelNotFound(LmcliError):
    """A model name or path does not resolve to anything runnable."""


class ModelFileError(LmcliError):
    """A model file is malformed, truncated or of an unsupported kind."""


@contextmanager
def model_file_errors():
    """The one place quant's typed errors (a malformed container, GGUF file, checkpoint or config) become lmcli's:
    `with model_file_errors(): ...` around every call into quant/ that reads or writes a model file."""
    from quant.errors import QuantError

    try:
        yield
    except QuantError as e:
        raise ModelFileError(str(e)) from None


class UsageError(LmcliError):
    """A flag or argument has a value outside its range."""

    exit_code = 2


class ContextOverflow(LmcliError):
    """The prompt does not fit in the context window."""


class StoreError(LmcliError):
    """The model store cannot be read or written."""


class BadName(UsageError, StoreError):
    """A store name that cannot be one (a usage error: exit code 2, like any bad argument)."""
