"""OpenCL optimizers with torch.optim's names, defaults and semantics."""

from netcl.optim.optimizer import Optimizer, families
from netcl.optim.rmsprop import RMSProp, RMSprop

__all__ = ["Optimizer", "families", "RMSProp", "RMSprop"]
from netcl.optim.adam import Adam, AdamW
from netcl.optim.sgd import SGD

__all__ += ["Adam", "AdamW", "SGD"]
from netcl.optim.checkpoint import CheckpointError, load, save

__all__ += ["CheckpointError", "load", "save"]
from netcl.optim.flat import FlatParameters, flatten_

__all__ += ["FlatParameters", "flatten_"]
from netcl.optim import lr_scheduler

__all__ += ["lr_scheduler"]
