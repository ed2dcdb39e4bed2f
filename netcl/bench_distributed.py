"""``python -m netcl.bench --distributed``: data-parallel costs under mpiexec.

Run it under MPI, e.g. ``mpiexec -n 4 python -m netcl.bench --distributed``.
For each group size k in 1, 2, 4 (those the job has ranks for; the first k
ranks take part, the others wait) it measures on ResNet-50's 161 parameter
shapes (25,557,032 float32s; ``--quick``: the same shapes scaled down 16x):

* the gradient all-reduce (:class:`netcl.distributed.GradientReducer`):
  device -> host bucket -> MPI -> device, and the part spent waiting for MPI;
* one Adam step through :class:`~netcl.distributed.DistributedOptimizer`
  (all-reduce + step) and through :class:`~netcl.distributed.ZeroRedundancyOptimizer`
  (all-reduce + shard step + parameter all-gather), each until the device is done;
* the optimizer state each rank holds (largest over the ranks), replicated and
  sharded.

Times are the slowest rank's median over the steps. Scaling is the step time
at k ranks relative to one rank: the optimizer side of data parallelism
(forward and backward are not part of it) costs this much more per step
while each rank's share of a fixed global batch shrinks k-fold. Ranks of one
node share its memory bandwidth and, on a CPU device, its cores.
"""

import argparse
import statistics
import sys
import time

import numpy as np

GROUP_SIZES = (1, 2, 4)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m netcl.bench --distributed",
                                 description="All-reduce, step time, scaling and per-rank "
                                             "state memory of netcl.distributed (under mpiexec)")
    ap.add_argument("--quick", action="store_true", help="ResNet-50's shapes scaled down 16x")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10, quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2, quick 1)")
    args, _ = ap.parse_known_args(argv)  # the other bench flags do not apply here
    args.steps = args.steps or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    return args


def shapes(quick):
    from netcl.bench import RESNET50_SHAPES

    if not quick:
        return [shape for _, shape in RESNET50_SHAPES]
    return [tuple(max(1, d // 4) if i < 2 else d for i, d in enumerate(shape))
            for _, shape in RESNET50_SHAPES]


def _params(netcl, queue, shape_list, seed):
    import pyopencl.array as cla

    rng = np.random.default_rng(seed)
    params = []
    for shape in shape_list:
        p = netcl.Parameter(cla.to_device(queue, rng.standard_normal(shape, np.float32)))
        p.grad = cla.to_device(queue, rng.standard_normal(shape, np.float32) * 1e-3)
        params.append(p)
    return params


def _median(comm, fn, queue, steps, warmup):
    """The slowest rank's median seconds of ``fn`` (device drained around each)."""
    times = []
    for i in range(warmup + steps):
        queue.finish()
        comm.barrier("the benchmark")
        start = time.perf_counter()
        fn()
        queue.finish()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return _slowest(comm, statistics.median(times))


def _slowest(comm, value):
    from netcl.distributed._comm import MPI

    box = np.array([value], np.float64)
    comm.allreduce_(box, "the benchmark", op=MPI.MAX)
    return float(box[0])


def measure(comm, queue, shape_list, args):
    import netcl
    from netcl.distributed import (DistributedOptimizer, GradientReducer,
                                   ZeroRedundancyOptimizer)
    from netcl.optim import Adam

    params = _params(netcl, queue, shape_list, comm.rank)
    grads = [p.grad for p in params]
    floats = sum(g.size for g in grads)
    reducer = GradientReducer(comm)
    waits = []

    def reduce():
        reducer.reduce(grads, queue)
        waits.append(reducer.last_wait_seconds)

    allreduce = _median(comm, reduce, queue, args.steps, args.warmup)
    mpi_wait = _slowest(comm, statistics.median(waits[args.warmup:]))
    pinned = bool(reducer._pinned)
    del reducer

    dp = DistributedOptimizer(Adam(params, lr=1e-4), comm)
    dp_step = _median(comm, dp.step, queue, args.steps, args.warmup)
    dp_state = _slowest(comm, dp.state_bytes())
    del dp

    zero = ZeroRedundancyOptimizer(params, Adam, comm, lr=1e-4)
    zero_step = _median(comm, zero.step, queue, args.steps, args.warmup)
    zero_state = _slowest(comm, zero.state_bytes())
    del zero
    return dict(ranks=comm.size, floats=floats, allreduce_ms=allreduce * 1e3,
                mpi_wait_ms=mpi_wait * 1e3, pinned=pinned,
                bus_gbps=(2 * (comm.size - 1) / comm.size * floats * 4 / mpi_wait / 1e9
                          if comm.size > 1 and mpi_wait > 0 else None),
                dp_step_ms=dp_step * 1e3, zero_step_ms=zero_step * 1e3,
                dp_state_mb=dp_state / 2**20, zero_state_mb=zero_state / 2**20)


def run(args):
    import netcl
    from netcl.distributed import Communicator
    from netcl.distributed._comm import MPI

    world = MPI.COMM_WORLD
    queue = netcl.default_queue()
    shape_list = shapes(args.quick)
    rows = []
    for k in GROUP_SIZES:
        if k > world.size:
            continue
        sub = world.Split(0 if world.rank < k else MPI.UNDEFINED, world.rank)
        if sub != MPI.COMM_NULL:
            rows.append(measure(Communicator(sub), queue, shape_list, args))
            sub.Free()
        world.Barrier()
    return dict(device=queue.device.name.strip(), world=world.size, rows=rows,
                mpi=MPI.Get_library_version().splitlines()[0].strip())


def report(result, stream=None):
    stream = stream or sys.stdout
    rows = result["rows"]
    floats = rows[0]["floats"]
    print(f"netcl.distributed on {result['device']}, {result['mpi']}; Adam over ResNet-50's "
          f"161 tensor shapes ({floats:,} float32s); slowest rank's median", file=stream)
    header = ("ranks", "all-reduce ms", "MPI wait ms", "bus GB/s", "DP step ms", "ZeRO step ms",
              "DP state MB/rank", "ZeRO state MB/rank", "DP step vs 1")
    print("  ".join(f"{h:>13}" for h in header), file=stream)
    base = rows[0]["dp_step_ms"]
    for r in rows:
        bus = "-" if r["bus_gbps"] is None else f"{r['bus_gbps']:.2f}"
        cells = (r["ranks"], f"{r['allreduce_ms']:.1f}", f"{r['mpi_wait_ms']:.1f}", bus,
                 f"{r['dp_step_ms']:.1f}", f"{r['zero_step_ms']:.1f}",
                 f"{r['dp_state_mb']:.1f}", f"{r['zero_state_mb']:.1f}",
                 f"{r['dp_step_ms'] / base:.2f}x")
        print("  ".join(f"{c:>13}" for c in cells), file=stream)
    if result["world"] < max(GROUP_SIZES):
        print(f"(run under mpiexec -n {max(GROUP_SIZES)} for every group size)", file=stream)


def main(argv=None):
    try:
        from netcl.distributed._comm import MPI
    except ImportError as exc:
        sys.exit(f"python -m netcl.bench --distributed: {exc}")
    args = parse_args(argv)
    result = run(args)
    if MPI.COMM_WORLD.rank == 0:
        report(result)
    return result
