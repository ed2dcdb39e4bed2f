"""netcl.devices() and ``python -m netcl.info``: every device pyopencl sees,
with facts that match pyopencl's own attributes, exactly one default chosen as
netcl.default_context() chooses it, layouts that follow the overrides, and
errors reported instead of raised."""

import json
import os
import re
import subprocess
import sys

import pyopencl as cl
import pytest

import netcl
import netcl.device
import netcl.info

# PYOPENCL_TEST too: pyopencl's create_some_context prefers it to PYOPENCL_CTX.
ENV_VARS = ("PYOPENCL_CTX", "PYOPENCL_TEST", "NETCL_LAYOUT", "NETCL_VECTOR_BYTES")


def pyopencl_devices():
    """``[(platform_index, device_index, device)]`` straight from pyopencl."""
    found = []
    for p_index, platform in enumerate(cl.get_platforms()):
        try:
            platform_devices = platform.get_devices()
        except cl.Error:
            continue
        found.extend((p_index, d_index, dev) for d_index, dev in enumerate(platform_devices))
    return found


@pytest.fixture
def clean_env(monkeypatch):
    """No device or layout overrides, and no default context made earlier in
    this process (another test may have created one under other settings)."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(netcl.device, "_default", {})
    return monkeypatch


def run_info(*args, env_overrides=None, code=None):
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(env_overrides or {})
    # -W error: the lazy netcl.devices export must not make runpy warn that
    # netcl.info was imported before it ran.
    command = ([sys.executable, "-c", code] if code else
               [sys.executable, "-W", "error::RuntimeWarning", "-m", "netcl.info"])
    return subprocess.run(command + list(args), env=env, capture_output=True,
                          text=True, timeout=120)


def expected_default():
    device, _ = netcl.device.pick_reason([dev for _, _, dev in pyopencl_devices()])
    return device


def test_devices_match_pyopencl(clean_env):
    records = netcl.devices()
    found = pyopencl_devices()
    assert len(records) == len(found) >= 1
    for record, (p_index, d_index, dev) in zip(records, found):
        assert (record.platform_index, record.device_index) == (p_index, d_index)
        assert record.selector == f"{p_index}:{d_index}"
        assert record.name == dev.name.strip()
        assert record.platform == dev.platform.name.strip()
        extensions = dev.extensions.split()
        assert record.fp64 == ("cl_khr_fp64" in extensions or dev.double_fp_config != 0), record
        assert record.fp16 == ("cl_khr_fp16" in extensions), record
        assert record.global_mem_bytes > 0
        assert record.opencl_version.startswith("OpenCL ")
        assert record.simulator == netcl.device.is_simulator(dev)
        assert record.layout == netcl.device.layout(dev)
        assert record.layout_error is None
        hstr = re.search(r"HSTR:\s*(\S+)", dev.version)
        assert record.compiler_target == (hstr.group(1) if hstr else None)


def test_pocl_is_listed_with_its_compiler_target(clean_env):
    pocl = [dev for _, _, dev in pyopencl_devices() if "Portable Computing Language" in dev.platform.name]
    if not pocl:
        pytest.skip("PoCL is not installed")
    records = [r for r in netcl.devices() if r.platform == "Portable Computing Language"]
    assert [r.name for r in records] == [dev.name.strip() for dev in pocl]
    for record, dev in zip(records, pocl):
        assert record.fp64 == ("cl_khr_fp64" in dev.extensions.split() or dev.double_fp_config != 0)
        if "HSTR:" in dev.version:
            assert record.compiler_target and record.compiler_target in dev.version


def test_exactly_one_default_and_it_is_the_one_netcl_uses(clean_env):
    records = netcl.devices()
    defaults = [r for r in records if r.default]
    assert len(defaults) == 1, records
    default = defaults[0]
    assert default.default_reason
    assert all(r.default_reason is None for r in records if not r.default)
    if any(not r.simulator for r in records):
        assert not default.simulator, "a simulator must never be the default"
    chosen = expected_default()
    assert (default.name, default.platform) == (chosen.name.strip(), chosen.platform.name.strip())
    # ... and it is the device netcl.default_queue() really opens.
    queue = netcl.default_queue()
    assert queue.device == chosen


def test_pyopencl_ctx_chooses_the_default(clean_env):
    records = netcl.devices()
    last = records[-1]
    clean_env.setenv("PYOPENCL_CTX", last.selector)
    records = netcl.devices()
    assert [r.selector for r in records if r.default] == [last.selector]
    reason = records[-1].default_reason
    assert "PYOPENCL_CTX" in reason and "create_some_context" in reason


def test_cli_prints_the_default_device():
    result = run_info()
    assert result.returncode == 0, result.stderr
    default = expected_default().name.strip()
    marked = [line for line in result.stdout.splitlines() if "<- netcl's default" in line]
    assert len(marked) == 1 and default in marked[0], result.stdout
    assert "Default: " in result.stdout and default in result.stdout
    assert 'pip install "netcl[intel]"' in result.stdout
    assert "OCL_ICD_VENDORS=$(python -m netcl.icd)" in result.stdout


def test_cli_json_parses():
    result = run_info("--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    devices = data["devices"]
    assert len(devices) == len(pyopencl_devices())
    defaults = [d for d in devices if d["default"]]
    assert len(defaults) == 1
    assert data["default"] == defaults[0]["selector"]
    assert defaults[0]["name"] == expected_default().name.strip()
    for d in devices:
        assert isinstance(d["fp64"], bool) and isinstance(d["fp16"], bool)
        assert d["layout"]["kind"] in ("cpu", "gpu")
        assert d["layout"]["vector_width"]["float32"] == d["layout"]["vector_bytes"] // 4


def test_default_layouts(clean_env):
    for record, (_, _, dev) in zip(netcl.devices(), pyopencl_devices()):
        if dev.type & cl.device_type.CPU:
            assert (record.layout.kind, record.layout.local_size) == ("cpu", 1)
            assert record.layout.vector_bytes <= 32, "never wider than 32 bytes on a CPU by default"
        else:
            assert (record.layout.kind, record.layout.local_size) == ("gpu", 128)
            assert record.layout.vector_bytes <= 16


def test_overrides_change_the_layout(clean_env):
    clean_env.setenv("NETCL_LAYOUT", "gpu")
    clean_env.setenv("NETCL_VECTOR_BYTES", "8")
    for record in netcl.devices():
        assert (record.layout.kind, record.layout.local_size, record.layout.vector_bytes) == ("gpu", 128, 8)
        assert "NETCL_LAYOUT=gpu" in record.layout.reason
        assert "NETCL_VECTOR_BYTES=8" in record.layout.reason
    clean_env.setenv("NETCL_LAYOUT", "cpu")
    clean_env.setenv("NETCL_VECTOR_BYTES", "4")
    for record in netcl.devices():
        assert (record.layout.kind, record.layout.local_size, record.layout.vector_bytes) == ("cpu", 1, 4)
        assert record.layout.vector_width("float32") == 1

    result = run_info("--json", env_overrides={"NETCL_LAYOUT": "gpu", "NETCL_VECTOR_BYTES": "16"})
    assert result.returncode == 0, result.stderr
    for d in json.loads(result.stdout)["devices"]:
        assert (d["layout"]["kind"], d["layout"]["local_size"], d["layout"]["vector_bytes"]) == ("gpu", 128, 16)
        assert d["layout"]["vector_width"] == {"float32": 4, "float64": 2}


@pytest.mark.parametrize("name, value", [("NETCL_LAYOUT", "fpga"), ("NETCL_VECTOR_BYTES", "48")])
def test_invalid_override_is_reported_not_raised(clean_env, name, value):
    clean_env.setenv(name, value)
    records = netcl.devices()
    assert records and sum(r.default for r in records) == 1
    for record in records:
        assert record.layout is None
        assert name in record.layout_error and value in record.layout_error

    result = run_info(env_overrides={name: value})
    assert result.returncode == 1  # listed, but every optimizer would refuse to run
    assert "Traceback" not in result.stderr
    assert f"ERROR: {name}={value!r} is not valid" in result.stdout
    assert expected_default().name.strip() in result.stdout

    result = run_info("--json", env_overrides={name: value})
    assert result.returncode == 1
    for d in json.loads(result.stdout)["devices"]:
        assert d["layout"] is None and name in d["layout_error"]


def test_no_platform_prints_the_install_hint(clean_env):
    clean_env.setattr(cl, "get_platforms", lambda: [])
    with pytest.raises(netcl.NoOpenCLDeviceError, match=re.escape('pip install "netcl[pocl]"')):
        netcl.devices()

    code = ("import sys, pyopencl as cl\n"
            "cl.get_platforms = lambda: []\n"
            "from netcl import info\n"
            "sys.exit(info.main(sys.argv[1:]))\n")
    result = run_info(code=code)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert 'pip install "netcl[pocl]"' in result.stderr
    result = run_info("--json", code=code)
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["devices"] == [] and 'pip install "netcl[pocl]"' in data["error"]


def test_devices_is_exported():
    assert "devices" in netcl.__all__
    assert netcl.devices is netcl.info.devices
    from netcl import devices

    assert devices is netcl.info.devices


def test_readme_quickstart_runs_as_written(tmp_path):
    """README.md's Quickstart (which `netcl.info` and its Devices section sit
    beside) is a complete program: paste it into a file and it runs."""
    readme = open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## Quickstart"):]
    code = section[section.index("```python\n") + len("```python\n"):]
    code = code[:code.index("```")]
    script = tmp_path / "quickstart.py"
    script.write_text(code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loss = float(result.stdout.split()[-1])
    assert loss < 1.0, result.stdout  # from 16311 at w = 0
    assert (tmp_path / "opt.safetensors").exists()
