"""Model configuration: one dataclass, field names as in the public API (DESIGN.md §1)."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Optional

VOCAB_MULTIPLE = 128  # the padded V GEMM ran at 680 TFLOP/s vs 246 unpadded on an H100 (DESIGN.md §3)


@dataclasses.dataclass
class ModelConfig:
    vocab_size: int
    seq_len: int
    hidden: int = 768
    n_blocks: int = 12
    n_heads: int = 12
    cond_dim: int = 128
    two_time: bool = False           # FMLM (v2): a second time embedding `sigma_map_prime`
    logit_cap: Optional[float] = 30.0  # released v2: cap(u) = 30 tanh(u/30); None/0 = no cap (v1)
    attn_softcap: Optional[float] = 50.0
    mlp_ratio: int = 4
    dropout: float = 0.0              # recorded from checkpoints; not applied (both trunks run without dropout)
    learnable_loss_weighting: bool = False
    rotary_base: float = 10_000.0

    def __post_init__(self):
        problems = []
        for name in ("vocab_size", "seq_len", "hidden", "n_blocks", "n_heads", "cond_dim", "mlp_ratio"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                problems.append(f"{name} must be a positive int, got {v!r}")
        if self.vocab_size < 2:
            problems.append("vocab_size must be at least 2")
        if not problems and self.hidden % self.n_heads:
            problems.append(f"hidden ({self.hidden}) must be divisible by n_heads ({self.n_heads})")
        if not problems and (self.hidden // self.n_heads) % 2:
            problems.append("head dim (hidden / n_heads) must be even for rotary embeddings")
        for name in ("two_time", "learnable_loss_weighting"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                numpy_bool = type(v).__module__ == "numpy" and type(v).__name__ in ("bool", "bool_")
                if (isinstance(v, int) and v in (0, 1)) or numpy_bool:       # 0/1, numpy bools (pickled configs)
                    setattr(self, name, bool(v))
                else:            # a string such as "no" is truthy: it would build the other model silently
                    problems.append(f"{name} must be a bool, got {v!r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("logit_cap", "attn_softcap"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf):
                problems.append(f"{name} must be None or a finite number ≥ 0 (0: no cap), got {v!r}")
        rb = self.rotary_base
        if isinstance(rb, bool) or not isinstance(rb, (int, float)) or not 1 < rb < math.inf:
            problems.append(f"rotary_base must be a finite number > 1, got {rb!r}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))
        if not self.logit_cap:
            self.logit_cap = None
        if not self.attn_softcap:
            self.attn_softcap = None

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**d)
