"""Typed errors of the quant package (lmcli maps them to user-facing errors)."""


class QuantError(Exception):
    """Base of every error raised by quant/."""


class ContainerError(QuantError):
    """A container file is malformed, truncated, or declares sizes or offsets it cannot hold."""


class GGUFError(QuantError):
    """A GGUF file cannot be imported (malformed, or a tensor type or architecture lmcli does not read)."""


class ConvertError(QuantError):
    """A model directory cannot be converted."""
