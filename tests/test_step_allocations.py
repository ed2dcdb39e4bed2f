"""After the first step, a step allocates nothing on the device.

pyopencl allocates every device buffer through ``pyopencl.Buffer`` (Arrays
without a custom allocator included), so wrapping it counts allocations.
"""

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
import pytest

import netcl
from netcl.optim import SGD, Adam, AdamW, RMSProp

from conftest import make_queue

OPTIMIZERS = [
    (RMSProp, dict()),
    (RMSProp, dict(momentum=0.9, centered=True, weight_decay=0.1)),
    (RMSProp, dict(momentum=0.9, nesterov=True, bias_correction=True, eps_in_sqrt=True)),
    (Adam, dict(amsgrad=True)),
    (AdamW, dict()),
    (SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (SGD, dict(lr=0.1)),
]
# Many tensors (several launches), a view at an odd offset (the unaligned
# kernel), lengths off the vector width and an empty tensor.
SHAPES = [(3, 3)] * 40 + [(64, 3, 7, 7), (1000,), (17,), (0,), (20011,)]


@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS,
                         ids=[f"{c.__name__}-{'-'.join(k)}" for c, k in OPTIMIZERS])
def test_no_device_allocation_after_first_step(ctx_factory, monkeypatch, cls, kwargs):
    queue = make_queue(ctx_factory)
    rng = np.random.default_rng(0)
    params = []
    for shape in SHAPES:
        p = netcl.Parameter(cla.to_device(queue, rng.standard_normal(shape).astype(np.float32)))
        p.grad = cla.to_device(queue, rng.standard_normal(shape).astype(np.float32))
        params.append(p)
    backing = cla.to_device(queue, rng.standard_normal(101).astype(np.float32))
    view = netcl.Parameter(backing[3:50], backing[50:97])
    params.append(view)
    opt = cls(params, **kwargs)
    opt.step()
    queue.finish()

    allocations = []
    real_buffer = cl.Buffer

    def counting_buffer(*args, **kw):
        allocations.append(args[2] if len(args) > 2 else kw)
        return real_buffer(*args, **kw)

    monkeypatch.setattr(cl, "Buffer", counting_buffer)
    before = view.data.get()
    for _ in range(5):
        opt.step()
        opt.param_groups[0]["lr"] *= 0.9  # a new lr must not allocate or rebuild either
    queue.finish()
    assert allocations == [], f"{len(allocations)} device allocations during steps"
    assert not np.array_equal(view.data.get(), before), "the steps did not update anything"
