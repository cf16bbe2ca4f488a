"""fmlm.kernels: the ops that touch the vocabulary axis, each with interchangeable backends.

`reference` is the spec (plain PyTorch, materializes V); `torch` is the chunked plain-PyTorch engine path;
`triton` the fused kernels (CUDA, or CPU under TRITON_INTERPRET=1 for tests).
"""
from . import reference
from .logits_argmax import logits_argmax
from .vocab_attention import vocab_attention

__all__ = ["reference", "logits_argmax", "vocab_attention"]
