"""The model config: one frozen dataclass built from the container's metadata."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

from ..errors import ModelFileError


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    vocab_size: int
    norm_eps: float
    rope_theta: float = 10000.0
    rope_dim: int = 0  # 0: the whole head
    rope_interleaved: bool = False  # True: rotate adjacent pairs (llama.cpp NORM); False: halves (NEOX/HF)
    n_ctx_train: int = 2048
    tied_embeddings: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from metadata, ignoring unknown keys; every size is checked."""
        if not isinstance(d, dict):
            raise ModelFileError("model config is missing from the container")
        known = {f.name: f for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        missing = [f.name for f in fields(cls) if f.name not in kw and f.default is MISSING]
        if missing:
            raise ModelFileError(f"model config lacks {', '.join(missing)}")
        try:
            cfg = cls(**kw)
        except TypeError as e:
            raise ModelFileError(f"bad model config: {e}") from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        ints = ("n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "head_dim", "vocab_size")
        for name in ints:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < (1 << 24):
                raise ModelFileError(f"model config: {name} = {v!r} is out of range")
        if self.n_head % self.n_head_kv:
            raise ModelFileError("model config: n_head is not a multiple of n_head_kv")
        if self.head_dim % 2 or self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise ModelFileError("model config: bad head_dim / rope_dim")
        if not (self.norm_eps > 0 and self.rope_theta > 0):
            raise ModelFileError("model config: norm_eps and rope_theta must be positive")

    @property
    def n_rot(self) -> int:
        return self.rope_dim or self.head_dim
