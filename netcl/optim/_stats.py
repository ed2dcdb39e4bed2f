"""``Optimizer.stats()``: the statistics a ``track_stats`` step wrote, as
nested dicts of Python numbers.

The update kernels write one row of :data:`netcl.optim._engine.STATS_COLUMNS`
per chunk of every tracked tensor (see kernels/track_stats.cl.mako); here the
rows are read with one wait, summed per parameter in float64 and aggregated
per group and over all groups.
"""

import math

import numpy as np
import pyopencl as cl

from netcl.optim._engine import FOUND_INF, STATS_COLUMNS

_COLUMN = {name: j for j, name in enumerate(STATS_COLUMNS)}


def empty():
    return {"step": 0, "skipped": False, "global": {}, "groups": {}}


def read(optimizer, program, steps, lrs):
    """The statistics of the step ``program`` last ran (the ``steps``-th
    tracked step, with the groups' learning rates ``lrs``)."""
    queue = optimizer._queue
    rows = np.empty((len(program.stats_rows), len(STATS_COLUMNS)), optimizer._factor_dtype())
    events = [cl.enqueue_copy(queue, rows, program.stats_buffer, is_blocking=False)]
    control = np.zeros(4, np.float32)
    if program.guard:
        events.append(cl.enqueue_copy(queue, control, optimizer._control.base_data,
                                      src_offset=optimizer._control.offset, is_blocking=False))
    cl.wait_for_events(events)
    skipped = bool(control[FOUND_INF] != 0)

    n = len(optimizer._position)
    rows = rows.astype(np.float64)
    per_param = np.zeros((n, len(STATS_COLUMNS)))
    per_param[:, _COLUMN["lr_min"]] = np.inf
    per_param[:, _COLUMN["lr_max"]] = -np.inf
    index = program.stats_rows.astype(np.intp)
    sums = [j for name, j in _COLUMN.items() if name not in ("lr_min", "lr_max")]
    np.add.at(per_param, (index[:, None], np.asarray(sums)[None, :]), rows[:, sums])
    np.minimum.at(per_param[:, _COLUMN["lr_min"]], index, rows[:, _COLUMN["lr_min"]])
    np.maximum.at(per_param[:, _COLUMN["lr_max"]], index, rows[:, _COLUMN["lr_max"]])

    groups = {}
    every = []
    for g, indices in sorted(program.tracked_indices.items()):
        group = optimizer.param_groups[g]
        state_names = optimizer._state_names(group)
        kinds = dict(
            second_moment=optimizer.stats_second_moment in state_names,
            momentum=optimizer.stats_momentum in state_names,
            effective_lr=optimizer.stats_effective_lr)
        names = group.get("param_names")
        params = {}
        totals = []
        for i in indices:
            _, position = optimizer._position[i]
            numel = group["params"][position].data.size
            key = names[position] if names else i
            params[key] = _report(per_param[i], numel, kinds, skipped)
            totals.append((per_param[i], numel, kinds))
        every += totals
        groups[g] = {"lr": float(lrs[g]), "stats": _aggregate(totals, skipped),
                     "params": params}
    return {"step": steps, "skipped": skipped, "global": _aggregate(every, skipped),
            "groups": groups}


def _report(values, numel, kinds, skipped):
    get = dict(zip(STATS_COLUMNS, values.tolist()))
    param_norm, update_norm = math.sqrt(get["param_sq"]), math.sqrt(get["update_sq"])
    out = {"grad_norm": math.sqrt(get["grad_sq"]), "param_norm": param_norm,
           "update_norm": 0.0 if skipped else update_norm,
           "update_to_weight": 0.0 if skipped else _ratio(update_norm, param_norm),
           "nonfinite": int(get["nonfinite"]), "zeros": int(get["zeros"]), "numel": int(numel)}
    if skipped:
        return out  # nothing was updated: no state or learning-rate statistics
    if kinds["second_moment"]:
        out["second_moment_rms"] = math.sqrt(get["second_moment_sq"] / numel) if numel else 0.0
    if kinds["effective_lr"]:
        out["lr_min"] = get["lr_min"] if numel else math.nan
        out["lr_max"] = get["lr_max"] if numel else math.nan
        out["lr_mean"] = get["lr_sum"] / numel if numel else math.nan
    if kinds["momentum"]:
        out["momentum_norm"] = math.sqrt(get["momentum_sq"])
    return out


def _aggregate(entries, skipped):
    """Norms from summed squares, counts summed, lr range and numel-weighted
    mean over the entries that have them."""
    if not entries:
        return {}
    total = {name: 0.0 for name in STATS_COLUMNS}
    total["lr_min"], total["lr_max"] = math.inf, -math.inf
    numel = second_numel = lr_numel = 0
    has = {"second_moment": False, "momentum": False, "effective_lr": False}
    for values, n, kinds in entries:
        get = dict(zip(STATS_COLUMNS, values.tolist()))
        for name in ("grad_sq", "nonfinite", "zeros", "param_sq", "update_sq"):
            total[name] += get[name]
        numel += n
        if kinds["second_moment"]:
            has["second_moment"] = True
            total["second_moment_sq"] += get["second_moment_sq"]
            second_numel += n
        if kinds["momentum"]:
            has["momentum"] = True
            total["momentum_sq"] += get["momentum_sq"]
        if kinds["effective_lr"]:
            has["effective_lr"] = True
            total["lr_sum"] += get["lr_sum"]
            total["lr_min"] = min(total["lr_min"], get["lr_min"])
            total["lr_max"] = max(total["lr_max"], get["lr_max"])
            lr_numel += n
    kinds = dict(has)
    out = _report(np.array([total[name] for name in STATS_COLUMNS]), numel, kinds, skipped)
    if not skipped:
        if has["second_moment"]:
            out["second_moment_rms"] = math.sqrt(total["second_moment_sq"] / second_numel) \
                if second_numel else 0.0
        if has["effective_lr"]:
            out["lr_mean"] = total["lr_sum"] / lr_numel if lr_numel else math.nan
            if not lr_numel:
                out["lr_min"] = out["lr_max"] = math.nan
    return out


def _ratio(update_norm, param_norm):
    if param_norm > 0:
        return update_norm / param_norm
    return 0.0 if update_norm == 0 else math.inf
