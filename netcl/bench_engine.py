"""The step engine's rows of ``python -m netcl.bench``: host cost per step and
the fused mixed-precision epilogue against torch on the same CPU.

Host cost: median wall time of ``opt.step()`` alone (the device is drained
before each timed call, so only the host's work is timed) for many small
tensors: with the gradients of the last step (``same``), with a new gradient
array for every tensor (``new``), and after :func:`netcl.optim.flatten_`
(``flat``). On a CPU device the kernels run on the host's own cores while
later ones are still being enqueued, so each row is also timed with the
device *held*: a barrier waiting on a user event sits ahead of the step's
kernels until the call returns — the host's work alone, as on a GPU.

Epilogue: one training step's optimizer work on a model's shapes — netcl's
plain Adam step; the same with ``skip_nonfinite`` (the guard: one extra read
of the gradients); with ``track_stats`` (statistics from the update pass:
no extra memory traffic); and the full epilogue, GradScaler + ``max_grad_norm`` +
Adam fused into the step. torch does the same with ``GradScaler.unscale_``,
``clip_grad_norm_(foreach=True)``, fused Adam and ``GradScaler.update``.
"""

import gc
import statistics
import time

import numpy as np
import pyopencl as cl

HOST_TENSOR_COUNTS = (1_000, 10_000)
HOST_TENSOR_SIZE = 64
HOST_MODES = ("same", "new", "flat")
MAX_NORM = 1.0


def _median_host_time(step, queue, steps, warmup, before=None, hold=False):
    for _ in range(warmup):
        if before:
            before()
        step()
    queue.finish()
    times = []
    for _ in range(steps):
        if before:
            before()
        queue.finish()
        if hold:
            release = cl.UserEvent(queue.context)
            cl.enqueue_barrier(queue, wait_for=[release])
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        if hold:
            release.set_status(cl.command_execution_status.COMPLETE)
    queue.finish()
    return statistics.median(times), times


def host_rows(netcl, queue, steps=15, warmup=3, counts=HOST_TENSOR_COUNTS, tick=None):
    """Rows of host time per Adam step for ``counts`` tensors of 64 floats."""
    import pyopencl.array as cla

    from netcl.optim import Adam, flatten_

    rows = []
    for n in counts:
        for mode in HOST_MODES:
            params = [netcl.Parameter(cla.zeros(queue, HOST_TENSOR_SIZE, np.float32))
                      for _ in range(n)]
            spare = [[cla.zeros(queue, HOST_TENSOR_SIZE, np.float32) for _ in range(n)]
                     for _ in range(2)]
            if mode == "flat":
                flatten_(params)
            else:
                for p, g in zip(params, spare[0]):
                    p.grad = g
            opt = Adam(params, lr=1e-3)
            flip = [0]

            def new_grads():
                flip[0] ^= 1
                for p, g in zip(params, spare[flip[0]]):
                    p.grad = g

            before = new_grads if mode == "new" else None
            median, times = _median_host_time(opt.step, queue, steps, warmup, before)
            held, _ = _median_host_time(opt.step, queue, steps, 1, before, hold=True)
            rows.append(dict(section="host", optimizer="adam", tensors=n, mode=mode,
                             us_per_step=median * 1e6, us_per_tensor=median * 1e6 / n,
                             us_per_tensor_held=held * 1e6 / n,
                             launches=len(opt._program.updates), steps=len(times)))
            if tick:
                tick(2 * steps + warmup + 1)
            del opt, params, spare
            gc.collect()
    return rows


def epilogue_rows(netcl, queue, torch, workload, host_views, steps, warmup, tick=None):
    """Rows timing the optimizer epilogue on ``workload``'s shapes;
    ``host_views`` are (param, grad) host arrays per tensor."""
    import pyopencl.array as cla

    from netcl.optim import Adam

    rows = []

    def netcl_params():
        params = []
        for data, grad in host_views:
            p = netcl.Parameter(cla.to_device(queue, np.ascontiguousarray(data)))
            p.grad = cla.to_device(queue, np.ascontiguousarray(grad))
            params.append(p)
        return params

    def add(impl, step, finish):
        try:
            median, times = _time(step, finish, steps, warmup)
        except Exception as exc:  # one broken row must not cost the others
            rows.append(dict(section="epilogue", workload=workload.name, optimizer="adam",
                             impl=impl, ms=None, status=f"failed: {type(exc).__name__}: {exc}"))
            return
        rows.append(dict(section="epilogue", workload=workload.name, optimizer="adam",
                         impl=impl, ms=median * 1e3, steps=len(times)))
        if tick:
            tick(steps + warmup)

    variants = [("netcl plain step", dict(), None),
                ("netcl skip_nonfinite", dict(skip_nonfinite=True), None),
                ("netcl track_stats", dict(track_stats=True), None),
                ("netcl scaler+clip+step", dict(max_grad_norm=MAX_NORM), "scaler")]
    for impl, kwargs, scaler_kind in variants:
        params = netcl_params()
        opt = Adam(params, lr=1e-4, **kwargs)
        if scaler_kind:
            try:
                from netcl.amp import GradScaler
            except ImportError as exc:  # pragma: no cover - older trees
                rows.append(dict(section="epilogue", workload=workload.name, optimizer="adam",
                                 impl=impl, ms=None, status=f"unavailable: {exc}"))
                continue
            scaler = GradScaler(queue, init_scale=1.0, growth_interval=10**6)

            def step(opt=opt, scaler=scaler):
                scaler.step(opt)
                scaler.update()
        else:
            step = opt.step
        add(impl, step, queue.finish)
        del opt, params
        gc.collect()

    if torch is not None:
        tensors = [torch.tensor(data, requires_grad=True) for data, _ in host_views]
        for t, (_, grad) in zip(tensors, host_views):
            t.grad = torch.tensor(grad)
        topt = torch.optim.Adam(tensors, lr=1e-4, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=10**6)
        scaler.scale(torch.ones(()))  # torch creates its scale at the first scale()

        def torch_step():
            with torch.no_grad():
                scaler.unscale_(topt)
                torch.nn.utils.clip_grad_norm_(tensors, MAX_NORM, foreach=True)
                scaler.step(topt)
                scaler.update()

        add("torch scaler+clip+fused", torch_step, lambda: None)
        del topt, tensors
        gc.collect()
    base = {r["impl"]: r["ms"] for r in rows if r.get("ms")}
    torch_ms = base.get("torch scaler+clip+fused")
    plain_ms = base.get("netcl plain step")
    for r in rows:
        if r.get("ms"):
            r["vs_torch"] = torch_ms / r["ms"] if torch_ms else None
            r["vs_plain"] = r["ms"] / plain_ms if plain_ms else None
    return rows


def _time(step, finish, steps, warmup):
    for _ in range(warmup):
        step()
    finish()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        finish()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def format_rows(rows):
    lines = []
    host = [r for r in rows if r["section"] == "host"]
    if host:
        lines.append("host time per step (opt.step() alone, Adam, tensors of "
                     f"{HOST_TENSOR_SIZE} floats; median):")
        lines.append(f"  {'tensors':>8}  {'grads':<5}  {'us/step':>10}  {'us/tensor':>9}  "
                     f"{'held':>6}  {'launches':>8}   (held: us/tensor with the device "
                     "held until step() returns)")
        for r in host:
            lines.append(f"  {r['tensors']:>8}  {r['mode']:<5}  {r['us_per_step']:>10.0f}  "
                         f"{r['us_per_tensor']:>9.2f}  {r['us_per_tensor_held']:>6.2f}  "
                         f"{r['launches']:>8}")
    epilogue = [r for r in rows if r["section"] == "epilogue"]
    if epilogue:
        lines.append("")
        lines.append("mixed-precision epilogue (median ms per step; vs torch = torch ms / "
                     "netcl ms; vs plain = ms / netcl plain step):")
        for r in epilogue:
            if r.get("ms") is None:
                lines.append(f"  {r['workload']:<9} {r['impl']:<26} {r.get('status', '')}")
                continue
            vs_torch = f"{r['vs_torch']:.2f}x" if r.get("vs_torch") else "-"
            vs_plain = f"{r['vs_plain']:.2f}" if r.get("vs_plain") else "-"
            lines.append(f"  {r['workload']:<9} {r['impl']:<26} {r['ms']:>9.2f} ms  "
                         f"vs torch {vs_torch:>6}  vs plain {vs_plain:>5}")
    return "\n".join(lines)
