"""Typed errors of the quant package (lmcli maps them to user-facing errors)."""


class QuantError(Exception):
    """Base of every error raised by quant/."""


class ContainerError(QuantError):
    """A container file is malformed, truncated, or declares sizes or offsets it cannot hold."""


class GGUFError(QuantError):
    """A GGUF file cannot be imported (malformed, or a tensor type or architecture lmcli does not read)."""


class ConvertError(QuantError):
    """A model directory cannot be converted."""


class SchemaError(QuantError):
    """A model config is incomplete, out of range or inconsistent; detail names the field, the message says where."""

    def __init__(self, detail: str):
        super().__init__(f"model config: {detail}")
        self.detail = detail
