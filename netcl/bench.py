"""Benchmark netcl's optimizer steps against the device's bandwidth and torch.optim.

Run ``python -m netcl.bench --help``. One run measures

* the device's bandwidth ceiling: a read-3/write-2 float32 kernel, the memory
  pattern of a plain RMSProp step, with 16-wide vector loads and stores;
* one ``step()`` of each netcl optimizer on a flat tensor, on ResNet-50's 161
  parameter tensors (and on one flat tensor of the same 25,557,032 floats, to
  show what splitting into many tensors costs) and on a BERT-base encoder;
* the matching ``torch.optim`` step on the host CPU, through each of its
  implementations (for-loop, foreach, fused) when torch is importable.

Optimizer steps are memory bound, so every row is also converted to GB/s with
the least traffic the update can cause (each state tensor read and written
once) and compared with the ceiling. Timings are medians of many steps because
shared machines are noisy.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

# PoCL reads this when its device starts; pinning its worker threads makes
# repeated runs comparable on a small shared CPU. It must precede the first
# OpenCL call, so it sits above the pyopencl import.
os.environ.setdefault("POCL_AFFINITY", "1")

import numpy as np  # noqa: E402
import pyopencl as cl  # noqa: E402
import pyopencl.array as cla  # noqa: E402

from netcl.device import layout as device_layout  # noqa: E402
from netcl.optim._engine import CHUNK  # noqa: E402
from netcl.optim.optimizer import families  # noqa: E402

DTYPE = np.dtype(np.float32)

# ---------------------------------------------------------------------------
# Workload shapes
# ---------------------------------------------------------------------------

#: torchvision ``resnet50()``'s parameters in ``named_parameters()`` order.
#: Written out (not built from torchvision) so the benchmark needs neither
#: torchvision nor torch; tests/test_bench.py cross-checks it against a
#: ResNet-50 assembled from torch.nn modules.
RESNET50_SHAPES = (
    ("conv1.weight", (64, 3, 7, 7)),
    ("bn1.weight", (64,)),
    ("bn1.bias", (64,)),
    ("layer1.0.conv1.weight", (64, 64, 1, 1)),
    ("layer1.0.bn1.weight", (64,)),
    ("layer1.0.bn1.bias", (64,)),
    ("layer1.0.conv2.weight", (64, 64, 3, 3)),
    ("layer1.0.bn2.weight", (64,)),
    ("layer1.0.bn2.bias", (64,)),
    ("layer1.0.conv3.weight", (256, 64, 1, 1)),
    ("layer1.0.bn3.weight", (256,)),
    ("layer1.0.bn3.bias", (256,)),
    ("layer1.0.downsample.0.weight", (256, 64, 1, 1)),
    ("layer1.0.downsample.1.weight", (256,)),
    ("layer1.0.downsample.1.bias", (256,)),
    ("layer1.1.conv1.weight", (64, 256, 1, 1)),
    ("layer1.1.bn1.weight", (64,)),
    ("layer1.1.bn1.bias", (64,)),
    ("layer1.1.conv2.weight", (64, 64, 3, 3)),
    ("layer1.1.bn2.weight", (64,)),
    ("layer1.1.bn2.bias", (64,)),
    ("layer1.1.conv3.weight", (256, 64, 1, 1)),
    ("layer1.1.bn3.weight", (256,)),
    ("layer1.1.bn3.bias", (256,)),
    ("layer1.2.conv1.weight", (64, 256, 1, 1)),
    ("layer1.2.bn1.weight", (64,)),
    ("layer1.2.bn1.bias", (64,)),
    ("layer1.2.conv2.weight", (64, 64, 3, 3)),
    ("layer1.2.bn2.weight", (64,)),
    ("layer1.2.bn2.bias", (64,)),
    ("layer1.2.conv3.weight", (256, 64, 1, 1)),
    ("layer1.2.bn3.weight", (256,)),
    ("layer1.2.bn3.bias", (256,)),
    ("layer2.0.conv1.weight", (128, 256, 1, 1)),
    ("layer2.0.bn1.weight", (128,)),
    ("layer2.0.bn1.bias", (128,)),
    ("layer2.0.conv2.weight", (128, 128, 3, 3)),
    ("layer2.0.bn2.weight", (128,)),
    ("layer2.0.bn2.bias", (128,)),
    ("layer2.0.conv3.weight", (512, 128, 1, 1)),
    ("layer2.0.bn3.weight", (512,)),
    ("layer2.0.bn3.bias", (512,)),
    ("layer2.0.downsample.0.weight", (512, 256, 1, 1)),
    ("layer2.0.downsample.1.weight", (512,)),
    ("layer2.0.downsample.1.bias", (512,)),
    ("layer2.1.conv1.weight", (128, 512, 1, 1)),
    ("layer2.1.bn1.weight", (128,)),
    ("layer2.1.bn1.bias", (128,)),
    ("layer2.1.conv2.weight", (128, 128, 3, 3)),
    ("layer2.1.bn2.weight", (128,)),
    ("layer2.1.bn2.bias", (128,)),
    ("layer2.1.conv3.weight", (512, 128, 1, 1)),
    ("layer2.1.bn3.weight", (512,)),
    ("layer2.1.bn3.bias", (512,)),
    ("layer2.2.conv1.weight", (128, 512, 1, 1)),
    ("layer2.2.bn1.weight", (128,)),
    ("layer2.2.bn1.bias", (128,)),
    ("layer2.2.conv2.weight", (128, 128, 3, 3)),
    ("layer2.2.bn2.weight", (128,)),
    ("layer2.2.bn2.bias", (128,)),
    ("layer2.2.conv3.weight", (512, 128, 1, 1)),
    ("layer2.2.bn3.weight", (512,)),
    ("layer2.2.bn3.bias", (512,)),
    ("layer2.3.conv1.weight", (128, 512, 1, 1)),
    ("layer2.3.bn1.weight", (128,)),
    ("layer2.3.bn1.bias", (128,)),
    ("layer2.3.conv2.weight", (128, 128, 3, 3)),
    ("layer2.3.bn2.weight", (128,)),
    ("layer2.3.bn2.bias", (128,)),
    ("layer2.3.conv3.weight", (512, 128, 1, 1)),
    ("layer2.3.bn3.weight", (512,)),
    ("layer2.3.bn3.bias", (512,)),
    ("layer3.0.conv1.weight", (256, 512, 1, 1)),
    ("layer3.0.bn1.weight", (256,)),
    ("layer3.0.bn1.bias", (256,)),
    ("layer3.0.conv2.weight", (256, 256, 3, 3)),
    ("layer3.0.bn2.weight", (256,)),
    ("layer3.0.bn2.bias", (256,)),
    ("layer3.0.conv3.weight", (1024, 256, 1, 1)),
    ("layer3.0.bn3.weight", (1024,)),
    ("layer3.0.bn3.bias", (1024,)),
    ("layer3.0.downsample.0.weight", (1024, 512, 1, 1)),
    ("layer3.0.downsample.1.weight", (1024,)),
    ("layer3.0.downsample.1.bias", (1024,)),
    ("layer3.1.conv1.weight", (256, 1024, 1, 1)),
    ("layer3.1.bn1.weight", (256,)),
    ("layer3.1.bn1.bias", (256,)),
    ("layer3.1.conv2.weight", (256, 256, 3, 3)),
    ("layer3.1.bn2.weight", (256,)),
    ("layer3.1.bn2.bias", (256,)),
    ("layer3.1.conv3.weight", (1024, 256, 1, 1)),
    ("layer3.1.bn3.weight", (1024,)),
    ("layer3.1.bn3.bias", (1024,)),
    ("layer3.2.conv1.weight", (256, 1024, 1, 1)),
    ("layer3.2.bn1.weight", (256,)),
    ("layer3.2.bn1.bias", (256,)),
    ("layer3.2.conv2.weight", (256, 256, 3, 3)),
    ("layer3.2.bn2.weight", (256,)),
    ("layer3.2.bn2.bias", (256,)),
    ("layer3.2.conv3.weight", (1024, 256, 1, 1)),
    ("layer3.2.bn3.weight", (1024,)),
    ("layer3.2.bn3.bias", (1024,)),
    ("layer3.3.conv1.weight", (256, 1024, 1, 1)),
    ("layer3.3.bn1.weight", (256,)),
    ("layer3.3.bn1.bias", (256,)),
    ("layer3.3.conv2.weight", (256, 256, 3, 3)),
    ("layer3.3.bn2.weight", (256,)),
    ("layer3.3.bn2.bias", (256,)),
    ("layer3.3.conv3.weight", (1024, 256, 1, 1)),
    ("layer3.3.bn3.weight", (1024,)),
    ("layer3.3.bn3.bias", (1024,)),
    ("layer3.4.conv1.weight", (256, 1024, 1, 1)),
    ("layer3.4.bn1.weight", (256,)),
    ("layer3.4.bn1.bias", (256,)),
    ("layer3.4.conv2.weight", (256, 256, 3, 3)),
    ("layer3.4.bn2.weight", (256,)),
    ("layer3.4.bn2.bias", (256,)),
    ("layer3.4.conv3.weight", (1024, 256, 1, 1)),
    ("layer3.4.bn3.weight", (1024,)),
    ("layer3.4.bn3.bias", (1024,)),
    ("layer3.5.conv1.weight", (256, 1024, 1, 1)),
    ("layer3.5.bn1.weight", (256,)),
    ("layer3.5.bn1.bias", (256,)),
    ("layer3.5.conv2.weight", (256, 256, 3, 3)),
    ("layer3.5.bn2.weight", (256,)),
    ("layer3.5.bn2.bias", (256,)),
    ("layer3.5.conv3.weight", (1024, 256, 1, 1)),
    ("layer3.5.bn3.weight", (1024,)),
    ("layer3.5.bn3.bias", (1024,)),
    ("layer4.0.conv1.weight", (512, 1024, 1, 1)),
    ("layer4.0.bn1.weight", (512,)),
    ("layer4.0.bn1.bias", (512,)),
    ("layer4.0.conv2.weight", (512, 512, 3, 3)),
    ("layer4.0.bn2.weight", (512,)),
    ("layer4.0.bn2.bias", (512,)),
    ("layer4.0.conv3.weight", (2048, 512, 1, 1)),
    ("layer4.0.bn3.weight", (2048,)),
    ("layer4.0.bn3.bias", (2048,)),
    ("layer4.0.downsample.0.weight", (2048, 1024, 1, 1)),
    ("layer4.0.downsample.1.weight", (2048,)),
    ("layer4.0.downsample.1.bias", (2048,)),
    ("layer4.1.conv1.weight", (512, 2048, 1, 1)),
    ("layer4.1.bn1.weight", (512,)),
    ("layer4.1.bn1.bias", (512,)),
    ("layer4.1.conv2.weight", (512, 512, 3, 3)),
    ("layer4.1.bn2.weight", (512,)),
    ("layer4.1.bn2.bias", (512,)),
    ("layer4.1.conv3.weight", (2048, 512, 1, 1)),
    ("layer4.1.bn3.weight", (2048,)),
    ("layer4.1.bn3.bias", (2048,)),
    ("layer4.2.conv1.weight", (512, 2048, 1, 1)),
    ("layer4.2.bn1.weight", (512,)),
    ("layer4.2.bn1.bias", (512,)),
    ("layer4.2.conv2.weight", (512, 512, 3, 3)),
    ("layer4.2.bn2.weight", (512,)),
    ("layer4.2.bn2.bias", (512,)),
    ("layer4.2.conv3.weight", (2048, 512, 1, 1)),
    ("layer4.2.bn3.weight", (2048,)),
    ("layer4.2.bn3.bias", (2048,)),
    ("fc.weight", (1000, 2048)),
    ("fc.bias", (1000,)),
)

RESNET50_TENSORS = 161
RESNET50_FLOATS = 25_557_032


def bert_base_shapes(layers=12, hidden=768, intermediate=3072, vocab=30522,
                     max_positions=512, type_vocab=2):
    """Parameter shapes of a BERT-base encoder (embeddings + layer stack).

    Names and ``(out, in)`` weight layout follow HuggingFace's ``BertModel``;
    the pooler is left out because it is not part of the encoder stack.
    """
    shapes = [
        ("embeddings.word_embeddings.weight", (vocab, hidden)),
        ("embeddings.position_embeddings.weight", (max_positions, hidden)),
        ("embeddings.token_type_embeddings.weight", (type_vocab, hidden)),
        ("embeddings.LayerNorm.weight", (hidden,)),
        ("embeddings.LayerNorm.bias", (hidden,)),
    ]
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for proj in ("attention.self.query", "attention.self.key",
                     "attention.self.value", "attention.output.dense"):
            shapes.append((p + proj + ".weight", (hidden, hidden)))
            shapes.append((p + proj + ".bias", (hidden,)))
        shapes += [
            (p + "attention.output.LayerNorm.weight", (hidden,)),
            (p + "attention.output.LayerNorm.bias", (hidden,)),
            (p + "intermediate.dense.weight", (intermediate, hidden)),
            (p + "intermediate.dense.bias", (intermediate,)),
            (p + "output.dense.weight", (hidden, intermediate)),
            (p + "output.dense.bias", (hidden,)),
            (p + "output.LayerNorm.weight", (hidden,)),
            (p + "output.LayerNorm.bias", (hidden,)),
        ]
    return tuple(shapes)


BERT_BASE_SHAPES = bert_base_shapes()
BERT_BASE_TENSORS = 197  # 5 embedding tensors + 12 layers x 16
BERT_BASE_FLOATS = 108_891_648


def count_floats(shapes):
    return sum(math.prod(shape) for _, shape in shapes)


@dataclass
class Workload:
    name: str
    description: str
    shapes: tuple
    torch: bool = True  # False: a netcl-only reference point

    @property
    def tensors(self):
        return len(self.shapes)

    @property
    def floats(self):
        return count_floats(self.shapes)


FULL_FLAT_SIZE = 50_000_000
QUICK_FLAT_SIZE = 1_000_000
QUICK_CEILING_SIZE = 10_000_000
# --quick keeps BERT's tensor shapes but not its size, so the smoke test stays
# under a minute on two cores: one encoder layer and a cut-down vocabulary.
QUICK_BERT_LAYERS = 1
QUICK_BERT_VOCAB = 4096
WORKLOAD_NAMES = ("flat", "resnet50", "bert")


def workloads(names=WORKLOAD_NAMES, flat_size=FULL_FLAT_SIZE, quick=False):
    """The workloads to run, in order; ``resnet50`` brings its flat twin."""
    out = []
    for name in names:
        if name == "flat":
            out.append(Workload("flat", f"one tensor of {flat_size:,} floats",
                                (("flat", (flat_size,)),)))
        elif name == "resnet50":
            out.append(Workload("resnet50", "torchvision ResNet-50 parameters",
                                RESNET50_SHAPES))
            out.append(Workload("resnet50-flat",
                                f"one tensor of {RESNET50_FLOATS:,} floats (ResNet-50's total)",
                                (("flat", (RESNET50_FLOATS,)),), torch=False))
        elif name == "bert":
            if quick:
                shapes = bert_base_shapes(layers=QUICK_BERT_LAYERS, vocab=QUICK_BERT_VOCAB)
                desc = (f"BERT-base shapes, {QUICK_BERT_LAYERS} encoder layer, "
                        f"vocabulary {QUICK_BERT_VOCAB} (--quick)")
            else:
                shapes = BERT_BASE_SHAPES
                desc = "BERT-base: embeddings + 12 encoder layers, no pooler"
            out.append(Workload("bert", desc, shapes))
        else:
            raise ValueError(f"unknown workload {name!r}; choose from {WORKLOAD_NAMES}")
    return out


# ---------------------------------------------------------------------------
# Optimizer configurations
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class OptimConfig:
    name: str
    netcl_class: str
    torch_class: str
    kwargs: dict = field(hash=False)
    #: float32-sized words the update must move per element: every tensor read
    #: (param, grad, state) plus every tensor written (param, state).
    words: int

    def bytes_per_element(self, itemsize=DTYPE.itemsize):
        return self.words * itemsize


LR = 1e-3


def _words(cls, kwargs):
    """float32-sized words an update moves per element: the parameter read
    and written, the gradient read, each state buffer read and written."""
    signature = inspect.signature(cls.__init__).parameters.values()
    group = {p.name: p.default for p in signature if p.default is not inspect.Parameter.empty}
    group.update(kwargs)
    return 3 + 2 * len(cls._state_names(None, group))


def _configs():
    """One config per variant each family lists in ``benchmark_variants``."""
    return tuple(OptimConfig(name, cls.__name__, cls.torch_name, dict(kwargs, lr=LR),
                             _words(cls, kwargs))
                 for cls in families().values()
                 for name, kwargs in cls.benchmark_variants.items())


OPTIMIZERS = _configs()
OPTIMIZER_NAMES = tuple(c.name for c in OPTIMIZERS)


def select_optimizers(names=None):
    if not names:
        return list(OPTIMIZERS)
    wanted = [n.lower() for n in names]
    unknown = [n for n in wanted if n not in OPTIMIZER_NAMES]
    if unknown:
        raise ValueError(f"unknown optimizer(s) {unknown}; choose from {OPTIMIZER_NAMES}")
    return [c for c in OPTIMIZERS if c.name in wanted]


# ---------------------------------------------------------------------------
# Progress bar
# ---------------------------------------------------------------------------

class Progress:
    """A one-line tqdm progress bar on stderr, silent unless stderr is a terminal
    (or tqdm, the ``bench`` extra, is not installed). ``done`` counts either way."""

    def __init__(self, total, enabled=True, stream=None):
        self.stream = stream or sys.stderr
        self.total = max(int(total), 1)
        self.done = 0
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm
            except ImportError:
                return
            # mininterval: redrawing on every step would cost time inside timed loops.
            self.bar = tqdm(total=self.total, file=self.stream, leave=False, mininterval=0.1,
                            dynamic_ncols=True, bar_format="{percentage:3.0f}% |{bar:24}| {desc}")

    def set_label(self, label):
        if self.bar is not None:
            self.bar.set_description_str(label)

    def advance(self, n=1):
        n = min(n, self.total - self.done)
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if self.done == self.total:  # the throttled update may not have drawn the end
                self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

def time_steps(step, sync, steps, warmup, tick=None):
    """Seconds of each of ``steps`` calls of ``step(); sync()`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
        sync()
        if tick:
            tick()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        if tick:
            tick()
    return times


_CEILING_SRC = r"""
// Reads a, b, c and writes a, b: the traffic of a plain RMSProp step
// (param, grad, v in; param, v out). Work item i owns `per` consecutive
// floatW vectors of each array; work item 0 also does the n % W leftovers.
// W is the vector width netcl's own kernels use on the device.
//
// The body dereferences floatW pointers instead of calling vloadW/vstoreW
// on float pointers: on PoCL (CPU) the latter measured about half the
// bandwidth, and a ceiling must be the best the device can do. The cast is
// valid because each array is a whole buffer, whose start OpenCL aligns to
// CL_DEVICE_MEM_BASE_ADDR_ALIGN (1024 bits on PoCL). Consecutive blocks per
// work item, one work item per group on CPUs, is the layout that measured
// fastest there (the optimizer kernels use it too). On GPUs (COALESCED) each
// group owns `per` * local-size consecutive vectors and its work items
// interleave, as the optimizer kernels' rows do there.
__kernel void read3_write2(__global float *a, __global float *b,
                           __global const float *c, const float s, const ulong n,
                           const ulong per)
{
    const size_t n16 = n / W;
#if COALESCED
    const size_t step = get_local_size(0);
    const size_t block = per * step;
    const size_t begin = get_group_id(0) * block + get_local_id(0);
    const size_t end = min((size_t)((get_group_id(0) + 1) * block), n16);
#else
    const size_t step = 1;
    const size_t begin = get_global_id(0) * per;
    const size_t end = min((size_t)(begin + per), n16);
#endif
    __global floatW *a16 = (__global floatW *)a;
    __global floatW *b16 = (__global floatW *)b;
    __global const floatW *c16 = (__global const floatW *)c;
    for (size_t i = begin; i < end; i += step) {
        const floatW va = a16[i], vb = b16[i], vc = c16[i];
        a16[i] = mad(vc, (floatW)(s), va);
        b16[i] = mad(vb, (floatW)(s), vc);
    }
    if (get_global_id(0) == 0) {
        for (size_t j = n16 * W; j < n; ++j) {
            const float x = a[j], y = b[j], z = c[j];
            a[j] = mad(z, s, x);
            b[j] = mad(y, s, z);
        }
    }
}
"""

_CEILING_PER_ITEM_BYTES = 65536  # of each array per work item


def ceiling_kernel(context):
    """The read-3/write-2 kernel, ``a = a + s*c; b = b*s + c``, in the
    device's netcl layout; run it with :func:`launch_ceiling`."""
    layout = device_layout(context.devices[0])
    width = layout.vector_width(np.float32)
    source = _CEILING_SRC.replace("floatW", f"float{width}" if width > 1 else "float")
    program = cl.Program(context, source).build(
        options=[f"-DW={width}", f"-DCOALESCED={int(layout.kind == 'gpu')}"])
    # Each ``program.read3_write2`` access builds a new kernel object, which
    # would drop the scalar dtypes set here.
    kernel = program.read3_write2
    kernel.set_scalar_arg_dtypes([None, None, None, np.float32, np.uint64, np.uint64])
    return kernel


def launch_ceiling(kernel, queue, a, b, c, s, n):
    """Enqueue the ceiling kernel over ``n`` floats of the Arrays a, b, c."""
    layout = device_layout(queue.device)
    width, local = layout.vector_width(np.float32), layout.local_size
    if layout.kind == "gpu":  # a group per CHUNK elements, like the optimizers' rows
        per_item = max(1, CHUNK // (width * local))
        items = max(1, -(-(n // width) // (per_item * local))) * local
    else:
        per_item = _CEILING_PER_ITEM_BYTES // (4 * width)
        items = max(1, -(-(n // width) // per_item))
        items = -(-items // local) * local
    return kernel(queue, (items,), (local,), a.data, b.data, c.data, s, n, per_item)


def measure_ceiling(queue, n=FULL_FLAT_SIZE, steps=20, warmup=3, tick=None, seed=0):
    """Median GB/s of the read-3/write-2 kernel over ``n`` floats, and its times."""
    kernel = ceiling_kernel(queue.context)
    rng = np.random.default_rng(seed)
    a, b, c = (cla.to_device(queue, rng.random(n, dtype=np.float32)) for _ in range(3))

    def step():
        # s is tiny so the values stay put however many steps run.
        launch_ceiling(kernel, queue, a, b, c, 1e-7, n)

    times = time_steps(step, queue.finish, steps, warmup, tick)
    del a, b, c
    gc.collect()
    median = statistics.median(times)
    return 5 * DTYPE.itemsize * n / median / 1e9, times


def _host_data(workload, seed=0):
    """One flat host buffer each for parameters and gradients, and their per-tensor views."""
    rng = np.random.default_rng(seed)
    n = workload.floats
    params = rng.standard_normal(n, dtype=np.float32)
    grads = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-2)
    views, offset = [], 0
    for _, shape in workload.shapes:
        size = math.prod(shape)
        views.append((params[offset:offset + size].reshape(shape),
                      grads[offset:offset + size].reshape(shape)))
        offset += size
    return views


def netcl_params(netcl, queue, host_views):
    params = []
    for p, g in host_views:
        param = netcl.Parameter(cla.to_device(queue, p))
        param.grad = cla.to_device(queue, g)
        params.append(param)
    queue.finish()
    return params


def torch_params(torch, host_views):
    params = []
    for p, g in host_views:
        param = torch.nn.Parameter(torch.from_numpy(p).clone())
        param.grad = torch.from_numpy(g).clone()
        params.append(param)
    return params


def time_netcl(netcl_optim, queue, params, config, steps, warmup, tick=None):
    opt = getattr(netcl_optim, config.netcl_class)(params, **config.kwargs)
    try:
        return time_steps(opt.step, queue.finish, steps, warmup, tick)
    finally:
        del opt
        gc.collect()


def torch_paths(torch, config):
    """(label, kwargs) of each torch.optim implementation of ``config``'s class."""
    cls = getattr(torch.optim, config.torch_class)
    accepted = inspect.signature(cls.__init__).parameters
    paths = [("forloop", dict(foreach=False)), ("foreach", dict(foreach=True))]
    if "fused" in accepted:
        paths.append(("fused", dict(fused=True)))
    return paths


def time_torch(torch, params, config, path_kwargs, steps, warmup, tick=None):
    cls = getattr(torch.optim, config.torch_class)
    opt = cls(params, **config.kwargs, **path_kwargs)
    try:
        with torch.no_grad():
            return time_steps(opt.step, lambda: None, steps, warmup, tick)
    finally:
        del opt
        gc.collect()


# ---------------------------------------------------------------------------
# Rows and table
# ---------------------------------------------------------------------------

def _row(workload, config, impl, times=None, error=None):
    row = dict(workload=workload.name, optimizer=config.name, impl=impl,
               tensors=workload.tensors, floats=workload.floats,
               bytes_per_step=workload.floats * config.bytes_per_element(),
               status="ok", ms=None, ms_min=None, steps=0, gbps=None,
               pct_ceiling=None, speedup=None, vs=None)
    if error is not None:
        row["status"] = f"unavailable: {error}"
        return row
    median = statistics.median(times)
    row.update(ms=median * 1e3, ms_min=min(times) * 1e3, steps=len(times),
               gbps=row["bytes_per_step"] / median / 1e9)
    return row


def add_ceiling(rows, ceiling):
    for r in rows:
        if r["status"] == "ok" and ceiling:
            r["pct_ceiling"] = 100.0 * r["gbps"] / ceiling
    return rows


def _describe(exc):
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")


def add_speedups(rows):
    """Fill netcl rows' ``speedup`` = fastest torch path's ms / netcl's ms."""
    best = {}
    for r in rows:
        if r["impl"].startswith("torch-") and r["status"] == "ok":
            key = (r["workload"], r["optimizer"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    for r in rows:
        b = best.get((r["workload"], r["optimizer"]))
        if r["impl"] == "netcl" and r["status"] == "ok" and b:
            r["speedup"] = b["ms"] / r["ms"]
            r["vs"] = b["impl"]
    return rows


def flat_resnet_ratios(rows):
    """Per optimizer: netcl ms on ResNet-50's 161 tensors / ms on one flat tensor as big."""
    ms = {(r["workload"], r["optimizer"]): r["ms"] for r in rows
          if r["impl"] == "netcl" and r["status"] == "ok"}
    return {opt: ms[("resnet50", opt)] / ms[("resnet50-flat", opt)]
            for (w, opt) in ms if w == "resnet50" and ("resnet50-flat", opt) in ms}


def format_table(rows):
    headers = ("workload", "optimizer", "impl", "ms/step", "GB/s", "% ceiling", "vs fastest torch")
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append((r["workload"], r["optimizer"], r["impl"], r["status"]))
            continue
        pct = "" if r["pct_ceiling"] is None else f"{r['pct_ceiling']:.0f}%"
        speed = "" if r["speedup"] is None else f"{r['speedup']:.2f}x ({r['vs']})"
        lines.append((r["workload"], r["optimizer"], r["impl"], f"{r['ms']:.2f}",
                      f"{r['gbps']:.1f}", pct, speed))
    full = [ln for ln in lines if len(ln) == len(headers)]
    widths = [max([len(h)] + [len(ln[i]) for ln in full]) for i, h in enumerate(headers)]
    for ln in lines:  # an "unavailable" note only widens the text columns it shares
        for i in range(3):
            widths[i] = max(widths[i], len(ln[i]))
    right = {3, 4, 5}

    def fmt(cells):
        out = []
        for i, cell in enumerate(cells):
            if len(cells) < len(headers) and i == len(cells) - 1:
                out.append(cell)  # the note runs on past the numeric columns
            else:
                out.append(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    body, prev = [], None
    for ln in lines:
        if prev is not None and ln[0] != prev:
            body.append("")
        prev = ln[0]
        body.append(fmt(ln))
    return "\n".join([fmt(headers), sep] + body)


# ---------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------

def load_netcl():
    """(netcl, netcl.optim, queue, None) or (None, None, queue-or-None, reason)."""
    try:
        import netcl
        import netcl.optim
    except Exception as exc:  # the library may be absent or half-written
        return None, None, None, _describe(exc)
    try:
        queue = netcl.default_queue()
    except Exception as exc:
        return None, None, None, _describe(exc)
    return netcl, netcl.optim, queue, None


def load_torch():
    try:
        import torch
    except Exception as exc:
        return None, _describe(exc)
    torch.set_num_threads(os.cpu_count() or 1)
    return torch, None


def machine_info(queue, torch, ceiling_gbps, ceiling_n, load_at_start=None):
    dev = queue.device
    try:
        import netcl
        netcl_version = getattr(netcl, "__version__", None)
    except Exception:
        netcl_version = None
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=dev.name.strip(),
        device_version=dev.version.strip(),
        opencl_c_version=dev.opencl_c_version.strip(),
        driver_version=dev.driver_version.strip(),
        platform=dev.platform.name.strip(),
        platform_version=dev.platform.version.strip(),
        compute_units=dev.max_compute_units,
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        processor=platform.processor() or None,
        python=platform.python_version(),
        numpy=np.__version__,
        pyopencl=".".join(map(str, cl.VERSION)),
        torch=getattr(torch, "__version__", None),
        torch_threads=torch.get_num_threads() if torch else None,
        netcl=netcl_version,
        pocl_affinity=os.environ.get("POCL_AFFINITY"),
        loadavg_at_start=load_at_start,
        ceiling_gbps=ceiling_gbps,
        ceiling_floats=ceiling_n,
    )


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m netcl.bench",
        description="Time netcl optimizer steps against the OpenCL device's bandwidth "
                    "ceiling and torch.optim on the host CPU.")
    ap.add_argument("--quick", action="store_true",
                    help="small sizes and few steps (a smoke test, under a minute on 2 cores)")
    ap.add_argument("--optim", action="append", metavar="NAME", choices=OPTIMIZER_NAMES,
                    help=f"run only this optimizer (repeatable): {', '.join(OPTIMIZER_NAMES)}")
    ap.add_argument("--workload", action="append", choices=WORKLOAD_NAMES,
                    help="run only this workload (repeatable); resnet50 also times one "
                         "flat tensor of the same size with netcl")
    ap.add_argument("--steps", type=int, metavar="N",
                    help="timed steps per measurement (default 20, --quick 2)")
    ap.add_argument("--warmup", type=int, metavar="N",
                    help="untimed steps first (default 3, --quick 1)")
    ap.add_argument("--size", type=int, metavar="N",
                    help=f"floats in the flat workload (default {FULL_FLAT_SIZE:,}, "
                         f"--quick {QUICK_FLAT_SIZE:,})")
    ap.add_argument("--ceiling-size", type=int, metavar="N",
                    help=f"floats per array of the bandwidth kernel (default {FULL_FLAT_SIZE:,}, "
                         f"--quick {QUICK_CEILING_SIZE:,})")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch.optim rows")
    ap.add_argument("--no-engine", action="store_true",
                    help="skip the step-engine rows (host cost per step, fused epilogue)")
    ap.add_argument("--json", metavar="PATH", help="also write rows and machine info here")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ap.add_argument("--distributed", action="store_true",
                    help="instead: netcl.distributed's all-reduce, step time, scaling and "
                         "per-rank state memory, under mpiexec (see netcl.bench_distributed)")
    ap.add_argument("--lowp", action="store_true",
                    help="instead: bytes per parameter and step time per optimizer x dtype x "
                         "state dtype on ResNet-50 shapes, with --dtype and --state-dtype "
                         "(see python -m netcl.bench_lowp --help)")
    args = ap.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.size = args.size if args.size is not None else (
        QUICK_FLAT_SIZE if args.quick else FULL_FLAT_SIZE)
    args.ceiling_size = args.ceiling_size if args.ceiling_size is not None else (
        QUICK_CEILING_SIZE if args.quick else FULL_FLAT_SIZE)
    for name in ("steps", "size", "ceiling_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    return args


def _loadavg():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


_fallback_context = []


def _fallback_queue():
    # Without a working netcl the ceiling and torch rows are still worth having.
    # The context is kept: Intel's CPU runtime frees a context with its last
    # Python handle even while a queue on it is in use.
    _fallback_context.append(cl.create_some_context(interactive=False))
    return cl.CommandQueue(_fallback_context[-1])


class _Unavailable(Exception):
    """A measurement that cannot be made; its message becomes the row's status."""


def _measure(w, c, impl, kw, ctx, args, tick):
    try:
        if impl == "netcl":
            if ctx["netcl_error"]:
                raise _Unavailable(ctx["netcl_error"])
            times = time_netcl(ctx["netcl_optim"], ctx["queue"], ctx["nparams"], c,
                               args.steps, args.warmup, tick)
        else:
            times = time_torch(ctx["torch"], ctx["tparams"], c, kw, args.steps,
                               args.warmup, tick)
        return _row(w, c, impl, times)
    except _Unavailable as exc:
        return _row(w, c, impl, error=str(exc))
    except Exception as exc:  # one broken optimizer must not cost the other rows
        return _row(w, c, impl, error=_describe(exc))


def _engine_rows(netcl, queue, torch, loads, args, progress):
    """Host cost per step and the fused epilogue (netcl.bench_engine)."""
    from netcl import bench_engine

    progress.set_label("engine: host cost per step")
    counts = (100, 1_000) if args.quick else bench_engine.HOST_TENSOR_COUNTS
    rows = bench_engine.host_rows(netcl, queue, steps=max(3, args.steps), counts=counts)
    for w in loads:
        if w.name not in ("resnet50", "bert", "flat"):
            continue
        progress.set_label(f"engine: {w.name} epilogue")
        rows += bench_engine.epilogue_rows(netcl, queue, torch, w, _host_data(w), args.steps,
                                           args.warmup)
        gc.collect()
    return rows


def run(args, progress_enabled=True):
    """Run the benchmark described by parsed ``args``; return the JSON-able result."""
    load_at_start = _loadavg()
    netcl, netcl_optim, queue, netcl_error = load_netcl()
    if queue is None:
        queue = _fallback_queue()
    torch, torch_error = (None, "--no-torch") if args.no_torch else load_torch()
    if torch_error and not args.no_torch:
        print(f"torch rows skipped: {torch_error}", file=sys.stderr)

    configs = select_optimizers(args.optim)
    names = args.workload or list(WORKLOAD_NAMES)
    names = [n for n in WORKLOAD_NAMES if n in names]  # fixed order, no duplicates
    loads = workloads(names, flat_size=args.size, quick=args.quick)
    per = args.steps + args.warmup
    planned = {w.name: [(c, impl, kw) for c in configs
                        for impl, kw in [("netcl", None)] + (
                            [(f"torch-{p}", k) for p, k in torch_paths(torch, c)]
                            if torch and w.torch else [])]
               for w in loads}
    progress = Progress(per * (2 + sum(map(len, planned.values()))), enabled=progress_enabled)
    ctx = dict(queue=queue, netcl_optim=netcl_optim, netcl_error=netcl_error, torch=torch)

    rows = []
    try:
        # The ceiling is measured before and after the workloads and the better
        # median kept: on a shared machine one of them may land in a busy spell.
        progress.set_label(f"bandwidth ceiling ({args.ceiling_size:,} floats)")
        ceilings = [measure_ceiling(queue, args.ceiling_size, args.steps, args.warmup,
                                    progress.advance)[0]]
        for w in loads:
            progress.set_label(f"{w.name}: preparing {w.floats:,} floats")
            host = _host_data(w)
            ctx["nparams"] = netcl_params(netcl, queue, host) if netcl else None
            ctx["tparams"] = torch_params(torch, host) if torch and w.torch else None
            for c, impl, kw in planned[w.name]:
                progress.set_label(f"{w.name} {c.name} {impl}")
                done_before = progress.done
                rows.append(_measure(w, c, impl, kw, ctx, args, progress.advance))
                progress.advance(per - (progress.done - done_before))
            # Free this workload's device and host memory before the next one allocates.
            del host
            ctx["nparams"] = ctx["tparams"] = None
            gc.collect()
        engine_rows = []
        if netcl and not args.no_engine:
            engine_rows = _engine_rows(netcl, queue, torch, loads, args, progress)
        progress.set_label("bandwidth ceiling again")
        ceilings.append(measure_ceiling(queue, args.ceiling_size, args.steps, args.warmup,
                                        progress.advance)[0])
    finally:
        progress.close()

    ceiling = max(ceilings)
    add_ceiling(rows, ceiling)
    add_speedups(rows)
    machine = machine_info(queue, torch, ceiling, args.ceiling_size, load_at_start)
    machine.update(ceiling_gbps_start=ceilings[0], ceiling_gbps_end=ceilings[1])
    return dict(machine=machine,
                settings=dict(steps=args.steps, warmup=args.warmup, quick=args.quick,
                              flat_size=args.size, dtype=str(DTYPE),
                              workloads={w.name: dict(description=w.description,
                                                      tensors=w.tensors, floats=w.floats)
                                         for w in loads}),
                rows=rows,
                engine_rows=engine_rows,
                flat_resnet_ratio=flat_resnet_ratios(rows),
                netcl_error=netcl_error)


def report(result, stream=None):
    stream = stream or sys.stdout
    m = result["machine"]
    s = result["settings"]
    print(f"device: {m['device']} ({m['device_version']}), {m['cpu_count']} CPUs, "
          f"torch {m['torch'] or 'not used'}", file=stream)
    print(f"bandwidth ceiling (read 3 / write 2 float32 kernel, {m['ceiling_floats']:,} floats): "
          f"{m['ceiling_gbps']:.1f} GB/s (best of {m['ceiling_gbps_start']:.1f} before and "
          f"{m['ceiling_gbps_end']:.1f} after the workloads)", file=stream)
    load = m.get("loadavg_at_start")
    if load is not None and load > 0.5 * (m["cpu_count"] or 1):
        # Other work on the CPUs shows up as slow, scattered steps in every row.
        print(f"note: load average was {load:.1f} on {m['cpu_count']} CPUs when the run "
              "started; expect noisy timings", file=stream)
    print(f"median of {s['steps']} steps after {s['warmup']} warm-up; "
          "GB/s counts each tensor read/written once per step", file=stream)
    for name, w in s["workloads"].items():
        tensors = f"{w['tensors']} tensor{'s' if w['tensors'] != 1 else ''}"
        print(f"  {name}: {w['description']}, {tensors}, {w['floats']:,} floats",
              file=stream)
    print(file=stream)
    print(format_table(result["rows"]), file=stream)
    if result.get("engine_rows"):
        from netcl import bench_engine

        print(file=stream)
        print(bench_engine.format_rows(result["engine_rows"]), file=stream)
    ratios = result["flat_resnet_ratio"]
    if ratios:
        print(file=stream)
        print("flat/resnet ratio (netcl ms on ResNet-50's 161 tensors / ms on one flat "
              f"tensor of {RESNET50_FLOATS:,} floats):", file=stream)
        print("  " + "  ".join(f"{k} {v:.2f}" for k, v in ratios.items()), file=stream)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--lowp" in argv:  # its own options (--dtype, --state-dtype)
        from netcl import bench_lowp
        return bench_lowp.main(argv)
    args = parse_args(argv)
    if args.distributed:
        from netcl import bench_distributed
        return bench_distributed.main(argv if argv is not None else sys.argv[1:])
    result = run(args, progress_enabled=not args.no_progress)
    report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, allow_nan=False)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()
