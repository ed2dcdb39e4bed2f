"""Run a resume worker in a new process on the test's device, and compare the
files the resumed run wrote with those of the uninterrupted one."""

import os
import subprocess
import sys
from pathlib import Path

import pyopencl as cl
import pytest

REPO = Path(__file__).resolve().parents[1]


def python_path():
    """PYTHONPATH for a child: the repository first, then whatever the parent
    had (packages installed with ``pip --target`` live only there)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


def device_env(queue):
    """Environment that makes a child's netcl.default_queue() use this queue's device."""
    device = queue.device
    for p, platform in enumerate(cl.get_platforms()):
        devices = platform.get_devices()
        if device in devices:
            return dict(os.environ, PYOPENCL_CTX=f"{p}:{devices.index(device)}",
                        PYTHONPATH=python_path())
    pytest.skip("device not found among the platforms")  # pragma: no cover


def resume_and_compare(args, queue, directory, names):
    """Run ``python *args`` (a worker that prints ``resumed <len(names)>``), then
    assert that for each name ``<name>.final{,.params}.safetensors`` equals
    ``<name>.expected{,.params}.safetensors`` in ``directory`` byte for byte."""
    done = subprocess.run([sys.executable, *map(str, args)], env=device_env(queue),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"resumed {len(names)}"
    for name in names:
        base = Path(directory) / name
        for suffix in (".safetensors", ".params.safetensors"):
            got = Path(f"{base}.final{suffix}").read_bytes()
            expected = Path(f"{base}.expected{suffix}").read_bytes()
            assert got == expected, f"{name}{suffix}: resumed run differs"
