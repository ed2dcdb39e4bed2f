"""``python -m netcl.bench --lowp``: memory and step time per optimizer ×
parameter dtype × state dtype on ResNet-50's shapes.

Per row: the bytes each parameter element occupies (parameter + gradient +
state, int8 scales and float32 small tensors included), the bytes a step
moves (parameter read and written, gradient read, every state buffer read
and written), the median step time, the resulting GB/s and that as a fraction
of the streaming ceiling (the bench's read-3/write-2 float32 kernel, measured
in the same run): how close the step comes to moving only those bytes.
"""

import argparse
import gc
import json
import statistics
import sys

import numpy as np
import pyopencl.array as cla

from netcl import bench

PARAM_DTYPES = ("float32", "bfloat16", "float16")
STATE_DTYPES = ("float32", "bfloat16", "int8")


def _dtype(name):
    from netcl.optim import _precision
    return {"float32": _precision.FLOAT32, "float16": _precision.FLOAT16,
            "bfloat16": _precision.BFLOAT16}[name]


def _params(queue, workload, dtype, seed=0):
    """netcl Parameters of ``dtype`` with ResNet-50's shapes, gradients set."""
    import netcl
    params = []
    for p, g in bench._host_data(workload, seed):
        param = netcl.Parameter(cla.to_device(queue, p.astype(dtype)))
        param.grad = cla.to_device(queue, g.astype(dtype))
        params.append(param)
    queue.finish()
    return params


def _state_bytes(opt, params):
    """Bytes of every state buffer (a sync: the step counts are read)."""
    total = 0
    for p in params:
        entry = opt.state.get(id(p), {})
        total += sum(v.nbytes for k, v in entry.items() if k != "step")
    return total


def measure(queue, workload, config, param_dtype, state_dtype, steps, warmup, ceiling):
    import netcl.optim as netcl_optim
    dtype = _dtype(param_dtype)
    params = _params(queue, workload, dtype)
    cls = getattr(netcl_optim, config.netcl_class)
    if state_dtype == "int8" and not cls.quantized_state:
        return None
    opt = cls(params, **config.kwargs, state_dtype=state_dtype)
    times = bench.time_steps(opt.step, queue.finish, steps, warmup)
    n = workload.floats
    state = _state_bytes(opt, params)
    # Resident: parameter + gradient + state. Moved: parameter twice,
    # gradient once, state twice (int8 scales included).
    resident = n * 2 * dtype.itemsize + state
    moved = n * 3 * dtype.itemsize + 2 * state
    median = statistics.median(times)
    gbps = moved / median / 1e9
    del opt, params
    gc.collect()
    return dict(optimizer=config.name, dtype=param_dtype, state_dtype=state_dtype,
                bytes_per_param=resident / n, moved_per_param=moved / n,
                ms=median * 1e3, gbps=gbps, of_ceiling=gbps / ceiling)


def format_rows(rows, ceiling):
    lines = [f"low precision on ResNet-50 shapes (ceiling {ceiling:.1f} GB/s, read-3/write-2 "
             "float32 kernel)",
             f"{'optimizer':<22}{'params':<10}{'state':<10}{'B/param':>8}{'B moved':>9}"
             f"{'ms':>9}{'GB/s':>8}{'of ceiling':>12}"]
    for r in rows:
        lines.append(f"{r['optimizer']:<22}{r['dtype']:<10}{r['state_dtype']:<10}"
                     f"{r['bytes_per_param']:>8.2f}{r['moved_per_param']:>9.2f}"
                     f"{r['ms']:>9.2f}{r['gbps']:>8.1f}{r['of_ceiling']:>11.0%}")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m netcl.bench --lowp", description=__doc__)
    ap.add_argument("--lowp", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="2 steps, ResNet-50 only, few rows")
    ap.add_argument("--optim", action="append", choices=bench.OPTIMIZER_NAMES)
    ap.add_argument("--dtype", action="append", choices=PARAM_DTYPES,
                    help="parameter dtype (repeatable; default all)")
    ap.add_argument("--state-dtype", action="append", choices=STATE_DTYPES,
                    help="state dtype (repeatable; default all)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--json", metavar="PATH")
    args, _ = ap.parse_known_args(argv)
    args.steps = args.steps or (2 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    return args


def main(argv=None):
    args = parse_args(argv)
    netcl, _, queue, error = bench.load_netcl()
    if error:
        raise SystemExit(f"netcl unavailable: {error}")
    workload = bench.workloads(["resnet50"], quick=args.quick)[0]
    ceiling_n = bench.QUICK_CEILING_SIZE if args.quick else bench.FULL_FLAT_SIZE
    ceiling = bench.measure_ceiling(queue, ceiling_n, args.steps, args.warmup)[0]
    configs = bench.select_optimizers(args.optim)
    dtypes = args.dtype or PARAM_DTYPES
    states = args.state_dtype or STATE_DTYPES
    rows = []
    for config in configs:
        for dtype in dtypes:
            for state in states:
                row = measure(queue, workload, config, dtype, state, args.steps, args.warmup,
                              ceiling)
                if row is not None:
                    rows.append(row)
                    print(format_rows([row], ceiling).splitlines()[-1], file=sys.stderr)
    print(format_rows(rows, ceiling))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(ceiling_gbps=ceiling, rows=rows), f, indent=2)
            f.write("\n")
    return rows


if __name__ == "__main__":
    main()
