"""Make Intel's pip-installed OpenCL CPU runtime visible to the ICD loader.

``pip install "netcl[intel]"`` installs Intel's CPU runtime (``intel-opencl-rt``
and ``intel-cmplr-lib-rt``), but the ``.icd`` file it ships
(``<prefix>/etc/OpenCL/vendors/intel-cpu.icd``) names a path on Intel's build
machine, so the OpenCL ICD loader never finds the library. This module writes a
vendors directory for ``OCL_ICD_VENDORS`` that holds

* ``netcl-intel-cpu.icd``, naming the installed ``libintelocl.so`` by its
  absolute path, and
* a copy of every ``.icd`` file the loader read before (those of the directory
  or file already in ``OCL_ICD_VENDORS``, else of ``/etc/OpenCL/vendors``), so
  that pointing ``OCL_ICD_VENDORS`` at it hides no driver that was visible.

From a shell, before starting Python::

    export OCL_ICD_VENDORS=$(python -m netcl.icd)

pyopencl's wheel finds its bundled PoCL and Oclgrind by itself, whatever
``OCL_ICD_VENDORS`` says. The variable is read when the loader first lists
platforms, so setting it inside a running process that already imported
pyopencl and asked for platforms has no effect.
"""

import hashlib
import os
import sys
import tempfile

#: The distribution that ships ``libintelocl.so``.
DISTRIBUTION = "intel-opencl-rt"
LIBRARY = "libintelocl.so"
ICD_NAME = "netcl-intel-cpu.icd"
SYSTEM_VENDORS = "/etc/OpenCL/vendors"

_INSTALL_HINT = ('Intel\'s OpenCL CPU runtime is not installed: pip install "netcl[intel]" '
                 "(or: pip install intel-opencl-rt intel-cmplr-lib-rt)")


class IntelRuntimeNotFound(RuntimeError):
    """``intel-opencl-rt`` is not installed, or its library cannot be found."""


def intel_library():
    """The absolute path of the installed ``libintelocl.so``.

    Looked up in the files ``intel-opencl-rt`` installed (its metadata), then
    in ``sys.prefix/lib``. Raises :class:`IntelRuntimeNotFound` if neither has it.
    """
    candidates = []
    try:
        from importlib import metadata

        files = metadata.files(DISTRIBUTION) or []
    except Exception:  # PackageNotFoundError, or metadata without a RECORD
        files = []
    for entry in files:
        if entry.name == LIBRARY:
            candidates.append(os.path.realpath(str(entry.locate())))
    candidates.append(os.path.join(sys.prefix, "lib", LIBRARY))
    for path in candidates:
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise IntelRuntimeNotFound(_INSTALL_HINT)


def _previous_icd_files(vendors):
    """The ``.icd`` files the loader reads with ``OCL_ICD_VENDORS=vendors``
    (unset or empty: the system directory)."""
    if not vendors:
        vendors = SYSTEM_VENDORS
    if os.path.isdir(vendors):
        return sorted(os.path.join(vendors, name) for name in os.listdir(vendors)
                      if name.endswith(".icd"))
    if os.path.isfile(vendors):
        return [vendors]
    return []


def _default_directory(library):
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    tag = hashlib.sha256(library.encode()).hexdigest()[:12]
    return os.path.join(cache, "netcl", "icd", tag)


def _write(path, text):
    """Write ``text`` to ``path`` atomically (another process may be reading it)."""
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_vendors_directory(directory=None, previous=None):
    """Write the vendors directory and return its absolute path.

    ``directory`` defaults to ``~/.cache/netcl/icd/<hash of the library path>``
    (``$XDG_CACHE_HOME`` if set). ``previous`` is what ``OCL_ICD_VENDORS`` said
    before (default: the current environment); its ``.icd`` files, or the
    system's, are copied in. Rewriting an existing directory is safe: stale
    ``.icd`` files of drivers since removed are deleted.

    Raises :class:`IntelRuntimeNotFound` if ``intel-opencl-rt`` is not installed.
    """
    library = intel_library()
    directory = os.path.abspath(directory or _default_directory(library))
    if previous is None:
        previous = os.environ.get("OCL_ICD_VENDORS", "")
    previous = os.path.abspath(previous) if previous else ""
    os.makedirs(directory, exist_ok=True)

    wanted = {ICD_NAME: library + "\n"}
    if previous != directory:  # re-running with the variable already exported
        for path in _previous_icd_files(previous):
            name = os.path.basename(path)
            if name == ICD_NAME:
                continue
            try:
                with open(path) as icd:
                    wanted[name] = icd.read()
            except OSError:
                continue  # an unreadable .icd hid nothing: the loader skips it too
    else:
        for name in os.listdir(directory):
            if name.endswith(".icd") and name != ICD_NAME:
                with open(os.path.join(directory, name)) as icd:
                    wanted[name] = icd.read()

    for name in os.listdir(directory):
        if name.endswith(".icd") and name not in wanted:
            os.unlink(os.path.join(directory, name))
    for name, text in wanted.items():
        _write(os.path.join(directory, name), text)
    return directory


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m netcl.icd",
        description="Write an OpenCL vendors directory that makes the pip-installed Intel "
                    "CPU runtime visible (plus copies of the system's .icd files) and print "
                    "its path, for: export OCL_ICD_VENDORS=$(python -m netcl.icd)")
    parser.add_argument("--dir", help="write the directory here (default: under ~/.cache/netcl)")
    args = parser.parse_args(argv)
    try:
        print(write_vendors_directory(args.dir))
    except IntelRuntimeNotFound as exc:
        print(f"netcl.icd: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
