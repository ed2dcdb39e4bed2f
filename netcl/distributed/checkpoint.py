"""Checkpoints of distributed optimizers, in netcl's one checkpoint format
(:mod:`netcl.optim.checkpoint`, atomic safetensors files).

*Consolidated*: one file, written by rank 0, exactly what
:func:`netcl.optim.save` writes for a single-process optimizer of the inner
class with the same parameters — so a single process loads it with
:func:`netcl.optim.load`, and a distributed optimizer loads a single
process's file. ZeRO gathers the shards on rank 0 first
(``consolidate_state_dict(to=0)``).

*Sharded*: one file per rank, :func:`shard_path` ``(path, rank, N)``
(``ck.safetensors`` -> ``ck.rank0-of-2.safetensors``), each an ordinary
checkpoint of the rank's inner optimizer plus the metadata entry
``netcl.distributed``: JSON ``{"rank", "world_size", "save_id"}`` (and
``"owners"``, the ZeRO partition). Every file of one save carries the same
random ``save_id``; loading on the same N refuses a set mixing saves (a save
interrupted after some ranks replaced their files).

Every rank of a collective save or load raises if any rank failed, naming
the rank and its error.
"""

import json
import uuid
from pathlib import Path

from netcl.optim import checkpoint
from netcl.optim.checkpoint_file import CheckpointError, read_tensors, write_tensors

__all__ = ["SHARD_KEY", "load_consolidated", "load_sharded", "save_consolidated",
           "save_sharded", "shard_path"]

#: The metadata key of a shard file's description.
SHARD_KEY = "netcl.distributed"


def shard_path(path, rank, world_size):
    """The file of ``rank`` in a sharded checkpoint at ``path``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}-of-{world_size}{path.suffix}")


class _Frozen:
    """What :func:`checkpoint.encode` reads of an optimizer, with a given state."""

    def __init__(self, optimizer, state_dict):
        self._optimizer = optimizer
        self._state_dict = state_dict

    def state_dict(self):
        return self._state_dict

    def __getattr__(self, name):
        # Everything else (groups, state dtype, master weights...) is the
        # optimizer's own: encode() records its construction options too.
        return getattr(self._optimizer, name)


def _attempt(function):
    try:
        return function(), None
    except Exception as exc:  # reported on every rank by check_all
        return None, exc


def save_consolidated(opt, path):
    state_dict = opt._full_state_dict()  # collective for ZeRO; None off rank 0

    def write():
        tensors, metadata = checkpoint.encode(_Frozen(opt.optim, state_dict))
        metadata["optimizer"] = type(opt.optim).__name__
        write_tensors(path, tensors, metadata)

    error = _attempt(write)[1] if opt.rank == 0 else None
    opt.comm.check_all(error, f"saving {path}")


def load_consolidated(opt, path):
    def read():
        state_dict, info = checkpoint.read(path)
        if info["optimizer"] != type(opt.optim).__name__:
            raise ValueError(f"{path}: checkpoint was written by {info['optimizer']}, "
                             f"this optimizer is {type(opt.optim).__name__}")
        return state_dict

    state_dict, error = _attempt(read)
    opt.comm.check_all(error, f"loading {path}")
    error = _attempt(lambda: opt._load_full_state_dict(state_dict))[1]
    opt.comm.check_all(error, f"loading {path}")


def save_sharded(opt, path):
    token = opt.comm.allgather_object(uuid.uuid4().hex if opt.rank == 0 else None,
                                      "the sharded save's id")[0]
    target = shard_path(path, opt.rank, opt.world_size)

    def write():
        tensors, metadata = checkpoint.encode(opt.optim)
        metadata[SHARD_KEY] = json.dumps(dict(rank=opt.rank, world_size=opt.world_size,
                                              save_id=token, **opt._shard_description()))
        write_tensors(target, tensors, metadata)

    opt.comm.check_all(_attempt(write)[1], f"saving the sharded checkpoint {path}")


def load_sharded(opt, path):
    source = shard_path(path, opt.rank, opt.world_size)

    def read():
        tensors, metadata = read_tensors(source, require_checksums=True)
        text = metadata.pop(SHARD_KEY, None)
        if text is None:
            raise CheckpointError(f"{source}: not a shard of a sharded checkpoint (no "
                                  f"{SHARD_KEY!r} metadata)")
        shard = json.loads(text)
        expected = dict(rank=opt.rank, world_size=opt.world_size, **opt._shard_description())
        for key, value in expected.items():
            if shard.get(key) != value:
                raise ValueError(f"{source}: written with {key}={shard.get(key)!r}, this "
                                 f"optimizer has {key}={value!r} (a sharded checkpoint "
                                 "resumes on the same number of ranks and parameters)")
        state_dict, info = checkpoint.decode(tensors, metadata, source)
        if info["optimizer"] != type(opt.optim).__name__:
            raise ValueError(f"{source}: checkpoint was written by {info['optimizer']}, "
                             f"this optimizer is {type(opt.optim).__name__}")
        return state_dict, shard["save_id"]

    result, error = _attempt(read)
    opt.comm.check_all(error, f"loading the sharded checkpoint {path}")
    state_dict, save_id = result
    ids = opt.comm.allgather_object(save_id, "the sharded checkpoint's ids")
    if len(set(ids)) != 1:
        raise CheckpointError(
            f"{path}: the ranks' shard files come from different saves (save ids by rank: "
            f"{ids}); a save was interrupted part-way — resume from a complete set")
    error = _attempt(lambda: opt.optim.load_state_dict(state_dict))[1]
    opt.comm.check_all(error, f"loading the sharded checkpoint {path}")
