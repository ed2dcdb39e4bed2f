"""Optimizer checkpoints: pickle-free files that resume bit-exactly, and
conversion to torch.optim's ``state_dict`` layout.

:func:`save` writes an optimizer's complete state (every state buffer, the
per-parameter step counts, each group's hyperparameters) to a safetensors file
through :mod:`netcl.optim.checkpoint_file` (atomic: the path holds the old or
the new checkpoint, never a mix); :func:`load` reads one back into an
optimizer built over the same parameters, checking everything before anything
changes. Loading and continuing gives the same bits as never stopping.

File layout (schema 2)
----------------------
Tensors, one per state buffer, named ``state.<index>.<buffer>`` (e.g.
``state.0.square_avg``), where ``<index>`` numbers the parameters across
groups in order, as in :meth:`Optimizer.state_dict`. A parameter without state
has no tensors.

``__metadata__`` (every value a string):

``format``
    ``"netcl.optim"``: marks the file as a netcl optimizer checkpoint.
``schema_version``
    ``"2"``: the layout described here (decimal).
``optimizer``
    the optimizer's class name, e.g. ``"RMSProp"``.
``netcl_version``
    the netcl version that wrote the file (informational only).
``param_groups``
    JSON list, one object per group: every hyperparameter (tuples such as
    ``betas`` as lists), ``"params"`` (the group's parameter indices) and
    ``"param_names"`` when the optimizer was given named parameters.
``params``
    JSON list, one object per parameter index: ``"shape"`` (list of ints),
    ``"dtype"`` (``"float32"`` or ``"float64"``), ``"step"`` (the
    parameter's update count; ``null`` when it has no state or its optimizer
    keeps no count, as SGD) and ``"state"`` (the names of its buffers, or
    ``null`` when it has no state).
``state_dtype``
    the optimizer's ``state_dtype`` (``"float32"``, ``"bfloat16"`` or
    ``"int8"``; only written when not ``"float32"``, which its absence
    means). :func:`load` refuses a file whose state dtype differs
    from the optimizer's, naming both. A parameter's ``"dtype"`` may be
    ``"float16"`` or ``"bfloat16"`` too, and its buffers may be stored in
    another dtype than the parameter (``master_param`` float32, bfloat16
    state, int8 state's uint8 codes and its per-block float32
    ``<name>_absmax`` scales): each tensor keeps its own dtype and shape, so a
    checkpoint restores every bit.
``netcl.checksums``
    the CRC-32 of every tensor and of the rest of the header, written and
    verified by :mod:`netcl.optim.checkpoint_file` (see there). A flipped bit
    anywhere in a tensor's data makes :func:`load` refuse the file with a
    :class:`CheckpointError` naming the file and the tensor; one in the
    metadata (a hyperparameter, a step count, a shape), naming the header.
    :func:`read` and :func:`load` never see this entry.
``schedulers`` and ``grad_scaler`` (optional)
    present when :func:`save` was given LR schedulers or a GradScaler: JSON
    of their state dicts (see :mod:`netcl.optim._training_state`). A reader
    that does not know them loads the optimizer alone.

Schema versions: schema 2 is schema 1 plus the checksums, which it requires:
a schema-2 file without them is refused. Schema-1 files (netcl before
checksums) have none; they still load, unverified, through the identity
migration ``_MIGRATIONS[1]``. A file with a newer ``schema_version`` than this
netcl reads is refused with :class:`CheckpointError`; an older one is
converted step by step by the functions in ``_MIGRATIONS``
(``{old_version: function}``, each turning ``(tensors, metadata)`` of its
version into the next one) before decoding.
"""

import inspect
import json

import numpy as np

import netcl
from netcl.optim import _quantize, _training_state
from netcl.optim.checkpoint_file import CheckpointError, read_tensors, write_tensors

__all__ = ["CheckpointError", "SCHEMA_VERSION", "decode", "encode", "load", "read", "save",
           "torch_state_dict"]

FORMAT = "netcl.optim"
SCHEMA_VERSION = 2
#: The first schema whose files must carry checksums.
_CHECKSUMS_SINCE = 2


def _migrate_1_to_2(tensors, metadata):
    # Schema 2 only adds the checksums, which the file layer verifies and
    # strips: a schema-1 file (which has none) decodes as it is, unverified.
    return tensors, metadata


#: ``{version: migrate}``: ``migrate(tensors, metadata)`` returns the same
#: checkpoint in the layout of ``version + 1`` (``metadata["schema_version"]``
#: is updated by the caller). Schema 1 is the first.
_MIGRATIONS = {1: _migrate_1_to_2}

_DTYPES = ("float32", "float64", "float16", "bfloat16")
_PARAM_KEYS = frozenset({"shape", "dtype", "step", "state"})


# ------------------------------------------------------------------- saving
def save(optimizer, path, *, schedulers=None, scaler=None):
    """Write ``optimizer``'s state to the safetensors file ``path``, atomically.

    ``schedulers`` (a :mod:`netcl.optim.lr_scheduler` scheduler or a list of
    them, all driving ``optimizer``) and ``scaler`` (a
    :class:`netcl.amp.GradScaler`) are saved in the same file, so that
    :func:`load` resumes the whole run from it. As in torch, functions
    (``LambdaLR``'s lambdas, ``CyclicLR``'s ``scale_fn``) are not saved;
    callable objects save their attributes.

    Waits for the device to finish the enqueued steps (the buffers are copied
    to the host). The parent directory must exist. Raises ``TypeError`` when a
    parameter group or a scheduler holds a value JSON cannot store exactly
    (hyperparameters are numbers, bools and tuples of numbers); nothing is
    written then.
    """
    tensors, metadata = encode(optimizer, schedulers=schedulers, scaler=scaler)
    write_tensors(path, tensors, metadata)


def encode(optimizer, *, schedulers=None, scaler=None):
    """The ``(tensors, metadata)`` pair :func:`save` writes (see the module doc);
    ``write_tensors`` adds the ``netcl.checksums`` entry."""
    schedulers = _training_state.scheduler_list(schedulers)
    _training_state.check_scaler(scaler)
    _training_state.check_owner(optimizer, schedulers)
    state_dict = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    tensors = {}
    described = []
    for index, p in enumerate(params):
        entry = state_dict["state"].get(index)
        info = {"shape": list(p.data.shape), "dtype": np.dtype(p.data.dtype).name,
                "step": None, "state": None}
        if entry:
            buffers = [name for name in entry if name != "step"]
            for name in buffers:
                tensors[f"state.{index}.{name}"] = entry[name]
            info["state"] = buffers
            if "step" in entry:
                info["step"] = int(entry["step"])
        described.append(info)
    groups = []
    for g, group in enumerate(state_dict["param_groups"]):
        for key, value in group.items():
            try:
                _json(value)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"parameter group {g}: cannot store {key}={value!r} in a "
                                f"checkpoint ({exc})") from None
        groups.append(group)
    metadata = {
        "format": FORMAT,
        "schema_version": str(SCHEMA_VERSION),
        "optimizer": type(optimizer).__name__,
        "netcl_version": netcl.__version__,
        "param_groups": _json(groups),
        "params": _json(described),
    }
    if optimizer.state_dtype != "float32":  # float32 files stay as they were
        metadata["state_dtype"] = optimizer.state_dtype
    metadata.update(_training_state.encode(schedulers, scaler))
    return tensors, metadata


def _json(value):
    return json.dumps(value, allow_nan=False, separators=(",", ":"), default=_json_value)


def _json_value(value):
    if isinstance(value, (np.bool_, np.integer, np.floating)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# ------------------------------------------------------------------ loading
def load(optimizer, path, *, schedulers=None, scaler=None):
    """Restore the state :func:`save` wrote to ``path`` into ``optimizer``
    (and into ``schedulers`` and ``scaler``, when given).

    ``optimizer`` must be of the same class, over parameters with the same
    group structure, shapes and dtypes (and names, where both the file and the
    optimizer have them); it may be fresh (no step taken yet) or not. The
    file's hyperparameters replace the groups' current ones, as with
    :meth:`Optimizer.load_state_dict`, which does the state checks and the
    loading. Group keys the optimizer does not own (``'initial_lr'``,
    ``'max_lr'``, ... that schedulers write) are restored too, as torch's
    ``load_state_dict`` restores every group key.

    ``schedulers`` and ``scaler`` are those of a fresh run built as before
    (same scheduler classes and arguments, in the order given to
    :func:`save`); the file must hold a state for each (a file with more
    loads into fewer objects only if none are given: the optimizer alone).
    Build the schedulers before loading, as with torch. Every check — the
    optimizer's, each scheduler's state keys, the scaler's values — happens
    before anything changes: on any error the optimizer, the schedulers and
    the scaler are left exactly as they were.

    Raises :class:`CheckpointError` for a file that is truncated, corrupt
    (a checksum mismatch names the tensor), not a netcl optimizer checkpoint
    (not even a safetensors file, e.g. a ``torch.save`` file, is named as
    such) or from a newer schema; ``ValueError`` /
    ``TypeError`` naming the group, parameter, expected and found values for a
    file that does not fit this optimizer; ``OSError`` for I/O problems.
    """
    schedulers = _training_state.scheduler_list(schedulers)
    _training_state.check_scaler(scaler)
    _training_state.check_owner(optimizer, schedulers)
    state_dict, info = read(path)
    load_rest = _training_state.prepare(schedulers, scaler, info["schedulers"],
                                        info["grad_scaler"], path)
    class_name = type(optimizer).__name__
    if info["optimizer"] != class_name:
        raise ValueError(f"{path}: checkpoint was written by {info['optimizer']}, "
                         f"this optimizer is {class_name}")
    if info["state_dtype"] != optimizer.state_dtype:
        raise ValueError(f"{path}: checkpoint holds state_dtype={info['state_dtype']!r} "
                         f"state, this optimizer was built with "
                         f"state_dtype={optimizer.state_dtype!r}; build it with "
                         f"state_dtype={info['state_dtype']!r} to load this file")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"{path}: checkpoint has {len(saved_groups)} parameter groups, "
                         f"this optimizer has {len(optimizer.param_groups)}")
    for g, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"{path}: parameter group {g}: checkpoint has "
                             f"{len(saved['params'])} parameters, this optimizer has "
                             f"{len(group['params'])}")
        saved_names = saved.get("param_names")
        names = group.get("param_names")
        for position, (index, p) in enumerate(zip(saved["params"], group["params"])):
            name = names[position] if names else (
                saved_names[position] if saved_names else None)
            where = f"{path}: parameter group {g}, parameter {index}" + (
                f" ({name!r})" if name is not None else "")
            if names and saved_names and saved_names[position] != names[position]:
                raise ValueError(f"{where}: checkpoint names it {saved_names[position]!r}, "
                                 f"this optimizer {names[position]!r}")
            described = info["params"][index]
            if tuple(described["shape"]) != tuple(p.data.shape):
                raise ValueError(f"{where}: checkpoint has shape {tuple(described['shape'])}, "
                                 f"this optimizer's parameter has shape {p.data.shape}")
            if described["dtype"] != np.dtype(p.data.dtype).name:
                raise TypeError(f"{where}: checkpoint has dtype {described['dtype']}, "
                                f"this optimizer's parameter has dtype {p.data.dtype}")
            has_step = described["step"] is not None
            if described["state"] is not None and has_step != bool(optimizer.step_in_state):
                raise CheckpointError(
                    f"{where}: the file's state {'has' if has_step else 'lacks'} a step count, "
                    f"but {class_name} "
                    f"{'keeps' if optimizer.step_in_state else 'keeps no'} step counts")
    try:
        optimizer.load_state_dict(state_dict)
    except (TypeError, ValueError) as exc:  # raised before anything changed
        raise type(exc)(f"{path}: {exc}") from None
    for group, saved in zip(optimizer.param_groups, saved_groups):
        group.update({key: value for key, value in saved.items()
                      if key not in optimizer.defaults and key not in ("params", "param_names")})
    load_rest()


def read(path):
    """Decode a checkpoint file without an optimizer.

    Returns ``(state_dict, info)``: ``state_dict`` in
    :meth:`Optimizer.state_dict`'s layout, ``info`` a dict with
    ``"optimizer"`` (class name), ``"schema_version"`` (of the file, before
    migration), ``"netcl_version"``, ``"params"`` (the per-parameter list
    described in the module doc), ``"schedulers"`` (a list of ``(class
    name, state_dict)``, or None when the file has none) and
    ``"grad_scaler"`` (a state dict, or None). Raises :class:`CheckpointError` for anything
    malformed or damaged (see :func:`load`).
    """
    tensors, metadata = read_tensors(path, require_checksums=_checksums_required)
    return decode(tensors, metadata, path)


def decode(tensors, metadata, path):
    """:func:`read` for the ``(tensors, metadata)`` of a file already read with
    ``read_tensors`` (errors name ``path``)."""

    def bad(what):
        return CheckpointError(f"{path}: {what}")

    if metadata.get("format") != FORMAT:
        raise bad("not a netcl optimizer checkpoint (its metadata has no "
                  f"'format': {FORMAT!r}; found {metadata.get('format')!r})")
    version_text = metadata.get("schema_version", "")
    if not (version_text.isascii() and version_text.isdigit()):
        raise bad(f"invalid schema_version {version_text!r}")
    version = file_version = int(version_text)
    if version > SCHEMA_VERSION:
        raise bad(f"written with checkpoint schema {version}, newer than schema "
                  f"{SCHEMA_VERSION}, the newest this netcl ({netcl.__version__}) reads; "
                  "upgrade netcl to load it")
    while version < SCHEMA_VERSION:
        migrate = _MIGRATIONS.get(version)
        if migrate is None:
            raise bad(f"written with checkpoint schema {version}, which this netcl cannot "
                      f"convert to schema {SCHEMA_VERSION}")
        try:
            tensors, metadata = migrate(dict(tensors), dict(metadata))
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"cannot convert from checkpoint schema {version} to {version + 1}: "
                      f"{type(exc).__name__}: {exc}") from None
        version += 1
        metadata["schema_version"] = str(version)

    for key in ("optimizer", "param_groups", "params"):
        if not isinstance(metadata.get(key), str):
            raise bad(f"metadata lacks {key!r}")
    try:
        groups = json.loads(metadata["param_groups"], parse_constant=_no_constant)
        params = json.loads(metadata["params"], parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise bad(f"metadata is not valid JSON: {exc}") from None

    if not isinstance(params, list):
        raise bad("metadata 'params' must be a list")
    for index, entry in enumerate(params):
        _check_param_entry(entry, index, bad)
    if not isinstance(groups, list) or not groups \
            or not all(isinstance(group, dict) for group in groups):
        raise bad("metadata 'param_groups' must be a non-empty list of objects")

    param_groups = []
    indices = []
    for g, group in enumerate(groups):
        members = group.get("params")
        if not isinstance(members, list) or not members \
                or not all(type(i) is int for i in members):
            raise bad(f"parameter group {g}: 'params' must be a non-empty list of indices")
        indices.extend(members)
        names = group.get("param_names")
        if names is not None and (not isinstance(names, list) or len(names) != len(members)
                                  or not all(isinstance(n, str) for n in names)):
            raise bad(f"parameter group {g}: 'param_names' must list one name per parameter")
        param_groups.append({key: _from_json(key, value) for key, value in group.items()})
    if indices != list(range(len(params))):
        raise bad(f"the groups' parameter indices {indices} do not number the "
                  f"{len(params)} parameters in order")

    state = {}
    expected = set()
    for index, entry in enumerate(params):
        if entry["state"] is None:
            continue
        shape, dtype = tuple(entry["shape"]), np.dtype(entry["dtype"])
        loaded = {}
        if entry["step"] is not None:
            loaded["step"] = entry["step"]
        for name in entry["state"]:
            key = f"state.{index}.{name}"
            expected.add(key)
            value = tensors.get(key)
            if value is None:
                raise bad(f"tensor {key!r} is missing")
            # State may be stored in another dtype than its parameter (a
            # float32 master copy, bfloat16 state): load_state_dict checks
            # the dtype the optimizer expects.
            allowed = {dtype.name} if dtype.name == "float64" else {
                dtype.name, "float32", "bfloat16", "uint8"}  # uint8: int8 state's codes
            expected_shape = (_quantize.blocks(int(np.prod(shape))),) \
                if name.endswith(_quantize.ABSMAX) else shape
            if value.shape != expected_shape or value.dtype.name not in allowed:
                raise bad(f"tensor {key!r} is {value.dtype}{list(value.shape)}, but parameter "
                          f"{index} is {dtype}{list(shape)}")
            loaded[name] = value
        state[index] = loaded
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise bad(f"tensor {unexpected[0]!r} belongs to no parameter's state")

    state_dtype = metadata.get("state_dtype", "float32")  # absent before low precision
    if state_dtype not in ("float32", "bfloat16", "int8"):
        raise bad(f"unknown state_dtype {state_dtype!r}")
    saved_schedulers, saved_scaler = _training_state.decode(metadata, bad)
    info = {"optimizer": metadata["optimizer"], "schema_version": file_version,
            "netcl_version": metadata.get("netcl_version"), "params": params,
            "schedulers": saved_schedulers, "grad_scaler": saved_scaler,
            "state_dtype": state_dtype}
    return {"state": state, "param_groups": param_groups}, info


def _checksums_required(metadata):
    """For read_tensors, about a file without checksums: the reason it must have
    them, or None. Only netcl checkpoints of schema 2 and later must; anything
    else (a schema-1 checkpoint, no netcl checkpoint at all, a newer or invalid
    schema) gets its own check in :func:`read`."""
    version = metadata.get("schema_version", "")
    if (metadata.get("format") == FORMAT and version.isascii() and version.isdigit()
            and _CHECKSUMS_SINCE <= int(version) <= SCHEMA_VERSION):
        return f"netcl optimizer checkpoints of schema {version} always do"
    return None


def _no_constant(token):
    raise ValueError(f"non-JSON constant {token}")


def _check_param_entry(entry, index, bad):
    where = f"parameter {index}"
    if not isinstance(entry, dict) or set(entry) != _PARAM_KEYS:
        raise bad(f"{where}: metadata must be an object with keys {sorted(_PARAM_KEYS)}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if entry["dtype"] not in _DTYPES:
        raise bad(f"{where}: dtype {entry['dtype']!r} is not one of {', '.join(_DTYPES)}")
    step = entry["step"]
    if step is not None and (type(step) is not int or step < 0):
        raise bad(f"{where}: step must be a non-negative integer or null, got {step!r}")
    buffers = entry["state"]
    if buffers is not None and (
            not isinstance(buffers, list) or not all(isinstance(b, str) for b in buffers)
            or len(set(buffers)) != len(buffers) or "step" in buffers):
        raise bad(f"{where}: state must be a list of distinct buffer names or null")
    if buffers is None and step is not None:
        raise bad(f"{where}: has a step count but no state")


def _from_json(key, value):
    # JSON has no tuples: hyperparameters given as tuples (betas) come back as such.
    if key in ("params", "param_names"):
        return value
    if isinstance(value, list):
        return tuple(_from_json(key, v) for v in value)
    return value


# ------------------------------------------------------------ torch layout


def torch_state_dict(optimizer, state_dict=None):
    """``optimizer``'s state in the layout ``torch.optim``'s ``load_state_dict`` takes.

    Buffers stay NumPy arrays (convert each with ``torch.from_numpy``); ``step``
    is a 0-d float32 array, as torch keeps it. Each group has torch's keys:
    the shared hyperparameters, torch's own options (``foreach``,
    ``capturable``, ...) at torch's defaults, ``params`` and ``param_names``
    when named. A netcl-only option (e.g. RMSProp's ``eps_in_sqrt``) at its
    default is left out; at any other value torch cannot reproduce the
    optimizer and ``ValueError`` says so. So does state torch has no place
    for: ``master_weights``, ``kahan`` and ``state_dtype="int8"``
    (``"bfloat16"`` state converts: torch casts loaded state to the
    parameter's dtype).
    """
    torch_name = type(optimizer).torch_name
    if torch_name is None:
        raise ValueError(f"{type(optimizer).__name__} has no torch.optim counterpart")
    for option, value, plain in (("master_weights", optimizer.master_weights, False),
                                 ("kahan", optimizer.kahan, False),
                                 ("state_dtype", optimizer.state_dtype, "float32")):
        if value != plain and (option != "state_dtype" or value == "int8"):
            raise ValueError(f"{option}={value!r} has no equivalent in torch.optim."
                             f"{torch_name}, which cannot represent this optimizer's state")
    shared, extras = optimizer.torch_hyperparameters, optimizer.torch_options
    if state_dict is None:
        state_dict = optimizer.state_dict()
    signature = inspect.signature(type(optimizer).__init__).parameters
    groups = []
    for g, group in enumerate(state_dict["param_groups"]):
        converted = {}
        for key, value in group.items():
            if key in optimizer.defaults and key not in shared:
                default = signature[key].default if key in signature else \
                    optimizer.engine_options.get(key)
                if not _same(value, default):
                    raise ValueError(
                        f"parameter group {g}: {key}={value!r} has no equivalent in "
                        f"torch.optim.{torch_name}, which cannot represent this optimizer "
                        f"(only {key}={default!r} converts)")
                continue
            converted[key] = value
        for key, value in extras.items():
            converted.setdefault(key, value)
        groups.append(converted)
    state = {}
    for index, entry in state_dict["state"].items():
        state[index] = {name: np.array(value, dtype=np.float32) if name == "step" else value
                        for name, value in entry.items()}
    return {"state": state, "param_groups": groups}


def _same(value, default):
    if isinstance(default, bool) or isinstance(value, (bool, np.bool_)):
        return isinstance(value, (bool, np.bool_)) and bool(value) == default
    return value == default
