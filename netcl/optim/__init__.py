"""OpenCL optimizers with torch.optim's names, defaults and semantics."""

from netcl.optim.optimizer import Optimizer
from netcl.optim.rmsprop import RMSProp, RMSprop

__all__ = ["Optimizer", "RMSProp", "RMSprop"]
