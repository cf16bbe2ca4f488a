"""fmlm: a custom-kernel engine for flow language models (FLM) and one-step flow-map language models (FMLM).

    import fmlm
    model = fmlm.load_checkpoint("fmlm.ckpt")
    tokens = fmlm.sample(model, batch_size=8, steps=1, method="fmlm")
"""
from fmlm.engine.config import ModelConfig
from fmlm.engine.model import FlowLM, refresh
from fmlm.engine.runner import Sampler
from fmlm.engine.sampling import sample
from fmlm.engine.schedule import gamma_to_tau, tau_to_gamma

__all__ = ["ModelConfig", "FlowLM", "Sampler", "sample", "refresh", "tau_to_gamma", "gamma_to_tau", "load_checkpoint",
           "save_checkpoint"]


def __getattr__(name):          # checkpoint IO imports safetensors lazily
    if name in ("load_checkpoint", "save_checkpoint"):
        from fmlm.engine import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(name)
