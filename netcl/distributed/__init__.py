"""Data-parallel training over MPI: gradient averaging, sharded optimizer
state (ZeRO-1), consistency checks and checkpoints for multi-process jobs.

Needs the optional extra ``pip install "netcl[mpi]"`` (mpi4py and the MPICH
wheel) or mpi4py built against another MPI; ``import netcl`` never needs it.
Run one process per device, e.g. ``mpiexec -n 2 python train.py``; see
wiki/Distributed.md.

* :class:`DistributedOptimizer` wraps any netcl optimizer and all-reduces the
  gradients before its step (Horovod's API).
* :class:`ZeroRedundancyOptimizer` shards the optimizer state over the ranks
  (torch's API) and all-gathers the updated parameters.
* Collectives fail within ``timeout`` seconds when another rank failed or
  died (the job is aborted with a message naming what timed out).
"""

from netcl.distributed._comm import (DEFAULT_TIMEOUT, Communicator, DistributedError,
                                     DistributedTimeoutError)
from netcl.distributed.checkpoint import shard_path
from netcl.distributed.optimizers import (ConsistencyError, DistributedOptimizer,
                                          ZeroRedundancyOptimizer, partition_parameters)
from netcl.distributed.reducer import DEFAULT_BUCKET_BYTES, GradientReducer

__all__ = ["Communicator", "ConsistencyError", "DEFAULT_BUCKET_BYTES", "DEFAULT_TIMEOUT",
           "DistributedError", "DistributedOptimizer", "DistributedTimeoutError",
           "GradientReducer", "ZeroRedundancyOptimizer", "partition_parameters", "shard_path"]
