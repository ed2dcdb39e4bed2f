"""The rest of a training run in an optimizer checkpoint: LR schedulers and
the GradScaler, as JSON metadata entries beside the optimizer's.

``schedulers``
    JSON list, one object per scheduler in the order given to
    :func:`netcl.optim.save`: ``{"class": <class name>, "state": <state_dict>}``.
``grad_scaler``
    JSON object: the GradScaler's ``state_dict()`` (``{}`` for a disabled one).

JSON cannot say everything a scheduler's state holds, so some values are
written as tagged objects ``{"__netcl__": <kind>, "value": ...}``: ``"float"``
for infinities and NaN (ReduceLROnPlateau's ``best`` starts at infinity),
``"counter"`` for a ``collections.Counter`` (MultiStepLR's milestones, as
``[key, count]`` pairs in order), ``"tuple"`` and ``"dict"`` (a dict whose
keys are not all strings, or that holds the tag key itself). Every other
value is plain JSON, and decoding gives back equal values of the same types,
so a resumed run writes the same bytes as one that never stopped.
Functions (lambdas, ``scale_fn``) are not saved, as in torch.
"""

import json
import math
from collections import Counter

import numpy as np

SCHEDULERS = "schedulers"
GRAD_SCALER = "grad_scaler"
_TAG = "__netcl__"


def scheduler_list(schedulers):
    """``schedulers`` as a list: None, one scheduler, or a list/tuple of them."""
    from netcl.optim.lr_scheduler import LRScheduler

    if schedulers is None:
        return []
    if isinstance(schedulers, LRScheduler):
        return [schedulers]
    if not isinstance(schedulers, (list, tuple)):
        raise TypeError("schedulers must be a netcl.optim.lr_scheduler scheduler or a "
                        f"list of them, got {type(schedulers).__name__}")
    for index, scheduler in enumerate(schedulers):
        if not isinstance(scheduler, LRScheduler):
            raise TypeError(f"schedulers[{index}] is a {type(scheduler).__name__}, not a "
                            "netcl.optim.lr_scheduler scheduler")
    return list(schedulers)


def check_scaler(scaler):
    from netcl.amp import GradScaler

    if scaler is not None and not isinstance(scaler, GradScaler):
        raise TypeError(f"scaler must be a netcl.amp.GradScaler or None, got "
                        f"{type(scaler).__name__}")


def check_owner(optimizer, schedulers):
    for index, scheduler in enumerate(schedulers):
        if scheduler.optimizer is not optimizer:
            raise ValueError(f"schedulers[{index}] ({type(scheduler).__name__}) drives "
                             "another optimizer")


# ------------------------------------------------------------------ encoding
def encode(schedulers, scaler):
    """The metadata entries for ``schedulers`` (a list) and ``scaler``; an
    entry only for what is given. ``TypeError`` names a value JSON cannot hold."""
    entries = {}
    if schedulers:
        saved = []
        for index, scheduler in enumerate(schedulers):
            name = type(scheduler).__name__
            state = _tagged(scheduler.state_dict(), f"schedulers[{index}] ({name})")
            saved.append({"class": name, "state": state})
        entries[SCHEDULERS] = _dumps(saved)
    if scaler is not None:
        entries[GRAD_SCALER] = _dumps(_tagged(scaler.state_dict(), "scaler"))
    return entries


def _dumps(value):
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def _tagged(value, where):
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, (np.bool_, np.integer, np.floating)):
        return _tagged(value.item(), where)
    if isinstance(value, float):
        return value if math.isfinite(value) else {_TAG: "float", "value": repr(value)}
    if isinstance(value, Counter):
        return {_TAG: "counter",
                "value": [[_tagged(k, where), _tagged(n, where)] for k, n in value.items()]}
    if isinstance(value, tuple):
        return {_TAG: "tuple", "value": [_tagged(v, where) for v in value]}
    if isinstance(value, list):
        return [_tagged(v, where) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and _TAG not in value:
            return {k: _tagged(v, f"{where}[{k!r}]") for k, v in value.items()}
        return {_TAG: "dict",
                "value": [[_tagged(k, where), _tagged(v, where)] for k, v in value.items()]}
    raise TypeError(f"{where}: cannot store a {type(value).__name__} in a checkpoint "
                    "(functions are not saved; a callable object's attributes must be "
                    "numbers, strings, lists, tuples or dicts of them)")


# ------------------------------------------------------------------ decoding
def decode(metadata, bad):
    """``(schedulers, scaler)`` from the metadata: a list of ``(class name,
    state)`` and a dict, each None where the file has no entry. ``bad(what)``
    makes the exception for a malformed entry."""
    schedulers = scaler = None
    if SCHEDULERS in metadata:
        saved = _loads(metadata[SCHEDULERS], SCHEDULERS, bad)
        if not isinstance(saved, list) or not all(
                isinstance(s, dict) and set(s) == {"class", "state"}
                and isinstance(s["class"], str) for s in saved):
            raise bad(f"metadata {SCHEDULERS!r} must be a list of objects with 'class' "
                      "and 'state'")
        schedulers = [(s["class"], _untagged(s["state"], bad)) for s in saved]
        for name, state in schedulers:
            if not isinstance(state, dict):
                raise bad(f"metadata {SCHEDULERS!r}: the {name} state must be an object")
    if GRAD_SCALER in metadata:
        scaler = _untagged(_loads(metadata[GRAD_SCALER], GRAD_SCALER, bad), bad)
        if not isinstance(scaler, dict):
            raise bad(f"metadata {GRAD_SCALER!r} must be an object")
    return schedulers, scaler


def _loads(text, key, bad):
    if not isinstance(text, str):
        raise bad(f"metadata {key!r} must be a string")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise bad(f"metadata {key!r} is not valid JSON: {exc}") from None


def _no_constant(token):
    raise ValueError(f"non-JSON constant {token}")


def _untagged(value, bad):
    if isinstance(value, list):
        return [_untagged(v, bad) for v in value]
    if not isinstance(value, dict):
        return value
    if _TAG not in value:
        return {k: _untagged(v, bad) for k, v in value.items()}
    kind, inner = value.get(_TAG), value.get("value")
    if set(value) != {_TAG, "value"}:
        raise bad(f"tagged value {value!r} must have exactly {_TAG!r} and 'value'")
    if kind == "float" and inner in ("inf", "-inf", "nan"):
        return float(inner)
    if kind == "tuple" and isinstance(inner, list):
        return tuple(_untagged(v, bad) for v in inner)
    if kind in ("counter", "dict") and isinstance(inner, list) and all(
            isinstance(pair, list) and len(pair) == 2 for pair in inner):
        pairs = [(_untagged(k, bad), _untagged(v, bad)) for k, v in inner]
        try:
            return Counter(dict(pairs)) if kind == "counter" else dict(pairs)
        except TypeError as exc:  # an unhashable key
            raise bad(f"tagged {kind} has a bad key: {exc}") from None
    raise bad(f"tagged value {value!r} is not one netcl writes")


# ------------------------------------------------------------------ loading
def prepare(schedulers, scaler, saved_schedulers, saved_scaler, where):
    """Check that the file's states fit ``schedulers`` and ``scaler``, changing
    nothing; return a function that loads them (it cannot fail)."""
    if schedulers:
        if saved_schedulers is None:
            raise ValueError(f"{where}: the checkpoint holds no scheduler state, "
                             f"{len(schedulers)} scheduler(s) given")
        if len(saved_schedulers) != len(schedulers):
            raise ValueError(f"{where}: the checkpoint holds {len(saved_schedulers)} "
                             f"scheduler state(s), {len(schedulers)} scheduler(s) given")
        for index, (scheduler, (name, state)) in enumerate(zip(schedulers, saved_schedulers)):
            what = f"{where}: schedulers[{index}]"
            if name != type(scheduler).__name__:
                raise ValueError(f"{what}: the checkpoint holds a {name}, this is a "
                                 f"{type(scheduler).__name__}")
            try:
                scheduler._check_state_dict(state)
            except (KeyError, TypeError, ValueError) as exc:
                message = exc.args[0] if exc.args else exc
                raise type(exc)(f"{what}: {message}") from None
    enabled = scaler is not None and scaler.is_enabled()
    if enabled:
        if not saved_scaler:
            raise ValueError(f"{where}: the checkpoint holds no GradScaler state (or that of "
                             "a disabled one)")
        try:
            scaler._checked_state(saved_scaler)
        except (KeyError, TypeError, ValueError) as exc:
            message = exc.args[0] if exc.args else exc
            raise type(exc)(f"{where}: GradScaler: {message}") from None

    def load():
        for scheduler, (_, state) in zip(schedulers, saved_schedulers or ()):
            scheduler.load_state_dict(state)
        if enabled:
            scaler.load_state_dict(saved_scaler)

    return load
