"""What OpenCL devices netcl sees, which one it uses, and how it lays out its
kernels on each.

Run ``python -m netcl.info`` (``--json`` for machine-readable output), or call
:func:`netcl.devices` for the same facts as a list of :class:`DeviceInfo`.
With no OpenCL platform at all the command prints how to install one and exits
with status 1; it also exits with status 1, after listing everything, when a
layout override (``NETCL_LAYOUT``, ``NETCL_VECTOR_BYTES``) is invalid, since
every optimizer would then refuse to run.
"""

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import pyopencl as cl

from netcl import device as _device
from netcl.device import NoOpenCLDeviceError, _INSTALL_HINT

#: What ``python -m netcl.info`` says about installing another CPU runtime.
INTEL_HINT = (
    'Intel\'s CPU runtime (any x86-64 CPU, AMD included): pip install "netcl[intel]", '
    "then export OCL_ICD_VENDORS=$(python -m netcl.icd) so that pyopencl's ICD "
    "loader finds it"
)

_ENV_VARS = ("PYOPENCL_CTX", _device.LAYOUT_ENV, _device.VECTOR_BYTES_ENV, "OCL_ICD_VENDORS")


@dataclass(frozen=True)
class DeviceInfo:
    """One OpenCL device as netcl sees it.

    ``platform_index``/``device_index`` are the numbers ``PYOPENCL_CTX`` takes
    (``PYOPENCL_CTX=1:0``). ``compiler_target`` is the ``HSTR:`` part of the
    device version where the driver gives one (PoCL: the LLVM triple and CPU it
    compiles for), else ``None``. ``layout`` is the :class:`netcl.device.Layout`
    netcl's kernels use there, or ``None`` with ``layout_error`` saying why
    (an invalid override). ``default_reason`` is set on the default device only.
    """

    platform_index: int
    device_index: int
    platform: str
    platform_version: str
    name: str
    type: str
    opencl_version: str
    driver_version: str
    compiler_target: Optional[str]
    global_mem_bytes: int
    native_float_vector_bytes: int
    fp64: bool
    fp16: bool
    simulator: bool
    default: bool
    default_reason: Optional[str]
    layout: Optional[_device.Layout]
    layout_error: Optional[str]

    @property
    def selector(self):
        """``"platform:device"``, the value of ``PYOPENCL_CTX`` that picks it."""
        return f"{self.platform_index}:{self.device_index}"


# ------------------------------------------------------------ device facts
_TYPE_BITS = (("GPU", cl.device_type.GPU), ("CPU", cl.device_type.CPU),
              ("ACCELERATOR", cl.device_type.ACCELERATOR), ("CUSTOM", cl.device_type.CUSTOM))


def _type_name(device):
    kinds = [name for name, bit in _TYPE_BITS if device.type & bit]
    return "|".join(kinds) if kinds else f"0x{device.type:x}"


def _extensions(device):
    try:
        return set(device.extensions.split())
    except cl.Error:
        return set()


def _fp64(device):
    if "cl_khr_fp64" in _extensions(device):
        return True
    try:
        return device.double_fp_config != 0
    except cl.Error:  # an OpenCL 1.0 device without doubles may refuse the query
        return False


def _opencl_version(version):
    match = re.match(r"\s*(OpenCL\s+\d+\.\d+)", version)
    return match.group(1) if match else version.strip()


def _compiler_target(version):
    match = re.search(r"HSTR:\s*(\S+)", version)
    return match.group(1) if match else None


def _safe(query, default=""):
    try:
        value = query()
    except cl.Error:
        return default
    return value.strip() if isinstance(value, str) else value


def _enumerate():
    """``([(platform_index, device_index, device)], problems)``; a platform
    that fails to list its devices is a problem, not an error."""
    try:
        platforms = cl.get_platforms()
    except cl.Error as exc:  # the ICD loader reports "no platforms" as an error
        raise NoOpenCLDeviceError(_INSTALL_HINT) from exc
    found, problems = [], []
    for p_index, platform in enumerate(platforms):
        try:
            platform_devices = platform.get_devices()
        except cl.Error as exc:
            problems.append(f"platform {p_index} ({_safe(lambda: platform.name, '?')}) "
                            f"lists no devices: {exc}")
            continue
        for d_index, dev in enumerate(platform_devices):
            found.append((p_index, d_index, dev))
    if not found:
        raise NoOpenCLDeviceError(_INSTALL_HINT)
    return found, problems


def _default_choice(all_devices):
    """``(device or None, reason)`` exactly as :func:`netcl.default_context` decides."""
    existing = getattr(_device, "_default", {}).get("context")
    if existing is not None:
        return existing.devices[0], "netcl.default_context() was already created on it"
    selector = os.environ.get("PYOPENCL_CTX")
    if selector:
        try:
            context = cl.create_some_context(interactive=False)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return None, (f"PYOPENCL_CTX={selector!r} is set, but pyopencl's "
                          f"create_some_context failed: {exc}")
        return context.devices[0], (f"PYOPENCL_CTX={selector!r} is set: "
                                    "netcl.default_context() uses pyopencl's create_some_context")
    return _device.pick_reason(all_devices)


def _describe(p_index, d_index, dev, default, default_reason):
    version = _safe(lambda: dev.version)
    try:
        layout, layout_error = _device.layout(dev), None
    except ValueError as exc:
        layout, layout_error = None, str(exc)
    return DeviceInfo(
        platform_index=p_index,
        device_index=d_index,
        platform=_safe(lambda: dev.platform.name),
        platform_version=_safe(lambda: dev.platform.version),
        name=_safe(lambda: dev.name),
        type=_type_name(dev),
        opencl_version=_opencl_version(version),
        driver_version=_safe(lambda: dev.driver_version),
        compiler_target=_compiler_target(version),
        global_mem_bytes=int(_safe(lambda: dev.global_mem_size, 0)),
        native_float_vector_bytes=4 * int(_safe(lambda: dev.native_vector_width_float, 0)),
        fp64=_fp64(dev),
        fp16="cl_khr_fp16" in _extensions(dev),
        simulator=_device.is_simulator(dev),
        default=default,
        default_reason=default_reason if default else None,
        layout=layout,
        layout_error=layout_error,
    )


def _collect():
    found, problems = _enumerate()
    chosen, reason = _default_choice([dev for _, _, dev in found])
    records = [_describe(p, d, dev, chosen is not None and dev == chosen, reason)
               for p, d, dev in found]
    if chosen is not None and not any(r.default for r in records):
        problems.append(f"the default device ({_safe(lambda: chosen.name, '?')}) "
                        "is not among the listed devices")
    if chosen is None:
        problems.append(reason)
    return records, problems


def devices() -> List[DeviceInfo]:
    """Every OpenCL device pyopencl can see, in ``PYOPENCL_CTX`` order, as
    :class:`DeviceInfo` records; exactly one has ``default=True`` (the device
    :func:`netcl.default_context` uses) unless ``PYOPENCL_CTX`` is invalid.

    Raises :class:`netcl.NoOpenCLDeviceError`, saying how to install PoCL,
    when there is no OpenCL platform or device at all.
    """
    return _collect()[0]


# ------------------------------------------------------------ rendering
def _bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def _layout_text(record):
    if record.layout is None:
        return f"ERROR: {record.layout_error}"
    lay = record.layout
    group = ("1 work-item per work-group" if lay.local_size == 1
             else f"work-groups of {lay.local_size}")
    dtypes = [np.float32] + ([np.float64] if record.fp64 else [])
    widths = ", ".join(f"{lay.vector_width(t)} x {np.dtype(t).name}" for t in dtypes)
    return f"{lay.kind}: {group}, {lay.vector_bytes}-byte vectors ({widths}) [{lay.reason}]"


def _intel_hidden(records):
    """Whether Intel's CPU runtime is pip-installed but no platform of it shows."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("intel-opencl-rt")
    except PackageNotFoundError:
        return False
    return not any(r.platform.startswith("Intel(R) OpenCL") and "CPU" in r.type.split("|")
                   for r in records)


def render_text(records, problems):
    import netcl

    lines = [f"netcl {netcl.__version__}, pyopencl {cl.VERSION_TEXT}: "
             f"{len(records)} OpenCL device{'s' if len(records) != 1 else ''}", ""]
    for r in records:
        tag = "   <- netcl's default" if r.default else ""
        if r.simulator:
            tag += "   (simulator: checks every access, slow; never picked by default)"
        lines.append(f"[{r.selector}] {r.name}{tag}")
        fields = [
            ("platform", f"{r.platform} ({r.platform_version})"),
            ("type", r.type),
            ("OpenCL", f"{r.opencl_version}, driver {r.driver_version}"),
        ]
        if r.compiler_target:
            fields.append(("compiler target", r.compiler_target))
        fields += [
            ("global memory", _bytes(r.global_mem_bytes)),
            ("fp64", "yes" if r.fp64 else "no (float32 only)"),
            ("fp16", "yes (cl_khr_fp16)" if r.fp16 else "no"),
            ("native vector", f"{r.native_float_vector_bytes} bytes (as the driver reports it)"),
            ("netcl layout", _layout_text(r)),
        ]
        lines += [f"    {key + ':':<16} {value}" for key, value in fields]
        lines.append("")

    default = next((r for r in records if r.default), None)
    if default is not None:
        lines.append(f"Default: [{default.selector}] {default.name} ({default.platform}): "
                     f"{default.default_reason}.")
    else:
        lines.append("Default: none could be chosen (see the problems below).")
    if not os.environ.get("PYOPENCL_CTX"):
        lines.append("  Order without PYOPENCL_CTX: the first GPU, else the first CPU device; "
                     "Oclgrind only if nothing else exists.")
        lines.append("  To choose another device: export PYOPENCL_CTX=<platform>:<device> "
                     "(the [p:d] above); netcl.default_context() then uses pyopencl's "
                     "create_some_context.")
    lines += [
        "",
        "Layout: CPU devices run one work-item per work-group with 32-byte vectors, "
        "GPUs work-groups of 128 (or the device's maximum) with 16-byte vectors.",
        f"  Overrides: {_device.LAYOUT_ENV}=cpu|gpu, {_device.VECTOR_BYTES_ENV}=4|8|16|32|64 "
        "(wider than 32 bytes on a CPU only if its compiler is known to handle it).",
        "",
        "Environment: " + ", ".join(f"{name}={os.environ[name]!r}" if os.environ.get(name)
                                    else f"{name} unset" for name in _ENV_VARS),
        "",
        "Another CPU runtime: " + INTEL_HINT + ".",
    ]
    if _intel_hidden(records):
        lines.append("  intel-opencl-rt is installed but its platform is not visible: "
                     "export OCL_ICD_VENDORS=$(python -m netcl.icd)")
    if problems:
        lines += ["", "Problems:"] + [f"  - {p}" for p in problems]
    return "\n".join(lines)


def to_json(records, problems):
    """A JSON-ready dict: ``devices`` (one object per device), ``default``
    (its ``"p:d"`` selector or ``None``), ``problems`` and the environment."""
    items = []
    for r in records:
        item = {k: getattr(r, k) for k in r.__dataclass_fields__ if k != "layout"}
        item["selector"] = r.selector
        if r.layout is None:
            item["layout"] = None
        else:
            item["layout"] = {
                "kind": r.layout.kind,
                "vector_bytes": r.layout.vector_bytes,
                "local_size": r.layout.local_size,
                "reason": r.layout.reason,
                "vector_width": {np.dtype(t).name: r.layout.vector_width(t)
                                 for t in (np.float32, np.float64)},
            }
        items.append(item)
    default = next((r.selector for r in records if r.default), None)
    return {
        "devices": items,
        "default": default,
        "problems": problems,
        "environment": {name: os.environ.get(name) for name in _ENV_VARS},
        "install_another_cpu_runtime": INTEL_HINT,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m netcl.info",
        description="List the OpenCL devices netcl sees, the one it uses by default and why, "
                    "and the kernel layout it uses on each.")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    try:
        records, problems = _collect()
    except NoOpenCLDeviceError as exc:
        if args.json:
            print(json.dumps({"devices": [], "default": None, "error": str(exc)}, indent=2))
        else:
            print(f"netcl: {exc}", file=sys.stderr)
            print("Another CPU runtime: " + INTEL_HINT + ".", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(to_json(records, problems), indent=2))
    else:
        print(render_text(records, problems))
    failed = any(r.layout_error for r in records) or not any(r.default for r in records)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
