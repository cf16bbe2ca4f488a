"""fmlm.kernels: the ops that touch the vocabulary axis (and the fused DiT ops), each with interchangeable
backends: `reference` is the spec (plain PyTorch, materializes V); `torch` the chunked plain-PyTorch engine
path; `triton` the fused kernels (CUDA, or CPU under TRITON_INTERPRET=1 for tests)."""
from . import reference
from .interp_embed import embed_cholesky, hidden_noise, interp_embed, vocab_noise
from .linear_cross_entropy import linear_cross_entropy, soft_linear_cross_entropy
from .logits_argmax import logits_argmax
from .vocab_attention import flow_map_step, vocab_attention

__all__ = ["reference", "logits_argmax", "vocab_attention", "flow_map_step", "linear_cross_entropy",
           "soft_linear_cross_entropy", "interp_embed", "vocab_noise", "hidden_noise", "embed_cholesky"]
