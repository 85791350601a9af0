"""lmcli: run Mixture-of-Experts language models locally on CPUs from 4-bit weights."""

__version__ = "0.1.0"


def load(name_or_path: str, options=None, **kw):
    """Load a model by name or path, with engine options (an EngineOptions, or its fields as keywords);
    see lmcli.api.load."""
    from .api import load as _load

    return _load(name_or_path, options, **kw)


__all__ = ["load", "__version__"]
