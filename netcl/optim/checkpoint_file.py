"""Reading and writing checkpoint files in the safetensors format.

This module is self-contained: it depends on numpy and the standard library
only (not on the ``safetensors`` package, pickle or OpenCL), so checkpoints
can be inspected and repaired without a GPU stack.

File format (https://github.com/huggingface/safetensors)
--------------------------------------------------------
::

    [8 bytes]  N, unsigned 64-bit little-endian: length of the header
    [N bytes]  UTF-8 JSON object (may be padded at the end with spaces):
               {"__metadata__": {"key": "value", ...},          # optional
                "<name>": {"dtype": "F32",
                           "shape": [d0, d1, ...],
                           "data_offsets": [begin, end]},
                ...}
    [rest]     byte buffer: the tensors' raw bytes, little-endian, C order,
               back to back; ``begin``/``end`` are relative to the start of
               this buffer and ``end - begin == prod(shape) * itemsize``.

Supported dtypes: ``BOOL U8 I8 U16 I16 U32 I32 U64 I64 F16 F32 F64 C64``
(numpy ``bool uint8 int8 uint16 int16 uint32 int32 uint64 int64 float16
float32 float64 complex64``) and, where the optional ``ml_dtypes`` package is
installed, ``BF16`` (``ml_dtypes.bfloat16``).  The ``F8_*`` types (and
``BF16`` without ``ml_dtypes``) are valid safetensors dtypes but have no
numpy equivalent; reading a file containing them raises
:class:`CheckpointError`.

Files written here are readable by the reference ``safetensors`` library and
files written by it are readable here.

Checksums
---------
Every file :func:`write_tensors` writes carries, in its ``__metadata__``
under the key ``"netcl.checksums"`` (:data:`CHECKSUMS_KEY`), a JSON object::

    {"algorithm": "crc32",
     "header": "1c291ca3",                  # the header, see below
     "tensors": {"<name>": "8e9f3a01", ...}}  # one per tensor, every tensor

Each value is a CRC-32 (:func:`zlib.crc32`, the checksum of zip, gzip and PNG)
as 8 lowercase hex digits.  A tensor's CRC covers its bytes as stored
(little-endian, C order).  The ``"header"`` CRC covers everything else the
header says - the other metadata and every tensor's dtype, shape and offsets -
in a canonical form: the ASCII bytes of ``json.dumps({"metadata": <metadata
without netcl.checksums>, "tensors": {<name>: [<dtype>, <shape>, <begin>,
<end>], ...}}, sort_keys=True, separators=(",", ":"))``.  CRC-32 detects
every single flipped bit and every burst of up to 32 bits, and misses random
damage with probability 2**-32; it runs at memory speed (about 2 GB/s here,
4x faster than ``hashlib.blake2b`` and 2x faster than SHA-256), so it adds
about 50 ms per 100 MB to a save and to a load.  It guards against accidental
damage (disk, copy, transfer), not against deliberate tampering: anyone can
recompute it.

:func:`read_tensors` verifies the checksums whenever a file has them: a
header mismatch is reported before any tensor data is read, a tensor mismatch
names the tensor.  A file without them (written by the reference library or
by netcl before checksums existed) is read unverified unless the caller
requires checksums.  The key is netcl's own: :func:`read_tensors` removes it
from the metadata it returns and :func:`write_tensors` refuses it in the
metadata it is given, so a read-modify-write round trip gets fresh checksums.

Guarantees
----------
* :func:`write_tensors` is atomic: at every instant ``path`` holds either the
  complete previous file or the complete new one, including after a crash or
  ``SIGKILL`` of the writing process (see its docstring for details).
* :func:`read_tensors` validates the whole file before trusting any of it and
  raises :class:`CheckpointError` (naming the file and the problem) for any
  malformed or damaged content.  A file that is no safetensors file at all (a
  ``torch.save`` zip archive or pickle, a NumPy file, a text file, an empty
  file) is reported as such.  It never unpickles or evaluates anything, and
  the memory it allocates is bounded by the size of the file.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import sys
import tempfile
import zlib
from collections.abc import Mapping

import numpy as np

__all__ = ["CHECKSUMS_KEY", "CheckpointError", "read_tensors", "write_tensors"]

# Same limit as the reference implementation: a larger header is almost
# certainly garbage, and refusing it keeps a corrupt length field from making
# us allocate gigabytes.
MAX_HEADER_BYTES = 100_000_000

_METADATA_KEY = "__metadata__"

#: The ``__metadata__`` key holding the checksums (see the module docstring).
CHECKSUMS_KEY = "netcl.checksums"
_CHECKSUM_ALGORITHM = "crc32"
_CHECKSUM_FIELDS = frozenset({"algorithm", "header", "tensors"})

# safetensors dtype string -> little-endian numpy dtype.
_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "C64": np.dtype("<c8"),
}
try:  # optional: ml_dtypes gives numpy a bfloat16 dtype
    import ml_dtypes
    _DTYPES["BF16"] = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    pass
# Known to safetensors but not representable in numpy: reported as such
# instead of as "unknown", so the user knows the file itself is fine.
_UNREPRESENTABLE_DTYPES = frozenset(
    {"BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"} - set(_DTYPES)
)
# Keyed by (kind, itemsize) so that big-endian inputs map to the same name;
# bfloat16 (kind "V", like any opaque 2-byte type) by the dtype itself.
_NAME_OF = {(dt.kind, dt.itemsize): name for name, dt in _DTYPES.items() if dt.kind != "V"}


def _name_of(dt):
    if dt.kind == "V":
        return "BF16" if dt == _DTYPES.get("BF16") else None
    return _NAME_OF.get((dt.kind, dt.itemsize))

_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


class CheckpointError(ValueError):
    """The content of a checkpoint file is malformed.

    The message names the file and what is wrong with it.  I/O problems
    (missing file, permissions, ...) are reported as the usual ``OSError``
    subclasses instead.
    """


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------

def write_tensors(path, tensors: dict[str, np.ndarray],
                  metadata: dict[str, str]) -> None:
    """Atomically write ``tensors`` and ``metadata`` to ``path`` (safetensors).

    ``tensors`` maps non-empty names (other than ``"__metadata__"``) to numpy
    arrays of a supported dtype (see the module docstring); any byte order and
    memory layout is accepted, data is stored little-endian in C order.
    ``metadata`` maps str to str (``None`` means no metadata); the key
    ``"netcl.checksums"`` is reserved: the file always gets that entry, holding
    the CRC-32 of every tensor and of the header (see the module docstring).

    Atomicity: the file is first written to a temporary file
    ``.<name>.<random>.tmp`` in the same directory, flushed and fsync'ed, then
    renamed over ``path`` with :func:`os.replace`, and finally the directory is
    fsync'ed (where the OS allows it) so the rename itself is durable.  If
    anything fails, the temporary file is removed, the exception propagates and
    any previous file at ``path`` is left untouched.  A process killed
    mid-write cannot remove its temporary file; such stale ``.tmp`` files are
    harmless and may be deleted.

    The parent directory of ``path`` must exist: it is *not* created, and a
    missing one raises :class:`FileNotFoundError` naming the directory.

    Raises :class:`TypeError` for a non-array value, an unsupported dtype
    (e.g. object, string, float128, complex128) or non-str metadata, and
    :class:`ValueError` for an invalid name or the reserved metadata key; all
    input checks happen before anything is written.
    """
    path = os.fspath(path)
    entries = _check_tensors(tensors)
    meta = _check_metadata(metadata)
    header = _build_header(entries, meta)  # computes the checksums

    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            errno.ENOENT,
            f"cannot write checkpoint {path!r}: directory does not exist",
            directory)

    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        # mkstemp creates the file with mode 0600; give the checkpoint the
        # permissions an ordinary open() would have given it.
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            fd = -1  # now owned (and closed) by f
            f.write(header)
            for _name, arr, _dtype_name in entries:
                if arr.size:
                    # A flat uint8 view of the little-endian copy: written
                    # straight from the array's memory, without tobytes().
                    f.write(arr.reshape(-1).view(np.uint8))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_directory(directory)


def _check_tensors(tensors):
    """Validate the inputs; return [(name, little-endian C array, dtype name)]
    in the order they are stored in the file."""
    if not isinstance(tensors, Mapping):
        raise TypeError(
            f"tensors must be a mapping of str to numpy arrays, "
            f"got {type(tensors).__name__}")
    entries = []
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor name {name!r} is not a str")
        if not name:
            raise ValueError("tensor name must not be empty")
        if name == _METADATA_KEY:
            raise ValueError(f"tensor name {_METADATA_KEY!r} is reserved")
        _check_utf8(name, "tensor name")
        if not isinstance(value, np.ndarray):
            raise TypeError(
                f"tensor {name!r}: expected a numpy array, "
                f"got {type(value).__name__}")
        dt = value.dtype
        dtype_name = None if dt.fields is not None else _name_of(dt)
        if dtype_name is None:
            raise TypeError(
                f"tensor {name!r}: dtype {dt} is not supported "
                f"(supported: {', '.join(str(d) for d in _DTYPES.values())})")
        # np.asarray(order="C") keeps 0-d arrays 0-d (ascontiguousarray
        # would not in older numpy) and only copies when it has to.
        arr = np.asarray(value, dtype=_DTYPES[dtype_name], order="C")
        entries.append((name, arr, dtype_name))
    # Like the reference writer: larger items first, so every tensor starts at
    # an offset that is a multiple of its item size (the header is padded to
    # 8 bytes), which lets readers map the data without copying.
    entries.sort(key=lambda e: (-e[1].dtype.itemsize, e[0]))
    return entries


def _check_metadata(metadata):
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(
            f"metadata must be a mapping of str to str, "
            f"got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise TypeError(f"metadata key {key!r} is not a str")
        if not isinstance(value, str):
            raise TypeError(
                f"metadata value for {key!r} must be a str, "
                f"got {type(value).__name__}")
        _check_utf8(key, "metadata key")
        _check_utf8(value, f"metadata value for {key!r}")
    if CHECKSUMS_KEY in metadata:
        raise ValueError(f"metadata key {CHECKSUMS_KEY!r} is reserved: write_tensors "
                         f"stores the file's checksums there")
    return dict(metadata)


def _check_utf8(text, what):
    # Lone surrogates survive json.dumps(ensure_ascii=False) but cannot be
    # encoded; catch them here with a message that says which string it is.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} {text!r} is not valid Unicode: {exc}") from None


def _build_header(entries, metadata):
    tensors = {}
    layout = []
    offset = 0
    for name, arr, dtype_name in entries:
        end = offset + arr.nbytes
        tensors[name] = {"dtype": dtype_name, "shape": list(arr.shape),
                         "data_offsets": [offset, end]}
        layout.append((name, dtype_name, arr.shape, offset, end))
        offset = end
    checksums = {
        "algorithm": _CHECKSUM_ALGORITHM,
        "header": _hex(_header_crc(metadata, layout)),
        "tensors": {name: _hex(_crc(arr)) for name, arr, _ in entries},
    }
    header = {_METADATA_KEY: dict(metadata, **{
        CHECKSUMS_KEY: json.dumps(checksums, separators=(",", ":"))})}
    header.update(tensors)
    body = json.dumps(header, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")
    # Pad with spaces (valid JSON whitespace) so the data starts 8-aligned.
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def _crc(arr):
    """CRC-32 of a little-endian C-contiguous array's bytes."""
    return zlib.crc32(arr.reshape(-1).view(np.uint8))


def _header_crc(metadata, layout):
    """CRC-32 of the header's content other than the checksums, in canonical
    form; ``layout`` is [(name, dtype name, shape, begin, end)]."""
    canonical = {"metadata": metadata,
                 "tensors": {name: [dtype_name, list(shape), begin, end]
                             for name, dtype_name, shape, begin, end in layout}}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True)
    return zlib.crc32(text.encode("ascii"))


def _hex(crc):
    return f"{crc:08x}"


def _umask():
    # Reading the umask means setting it; Linux exposes it read-only in /proc,
    # which avoids a window in which other threads would see umask 0.
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(directory):
    # Makes the rename durable on POSIX.  Some platforms (Windows) cannot open
    # or fsync a directory; the file is already in place, so this is best
    # effort and never turns a completed write into a failure.
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        dfd = os.open(directory, flags)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


# --------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------

def read_tensors(path, *, require_checksums=False
                 ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file; return ``(tensors, metadata)``.

    ``tensors`` maps names to freshly allocated, writable numpy arrays in
    native byte order (0-d tensors have shape ``()``), in the order of the
    file's header; ``metadata`` is the ``__metadata__`` map (``{}`` if absent)
    without the ``"netcl.checksums"`` entry.

    The whole header is validated before any data is read, and the tensors
    must tile the data region exactly: no tensor may lie outside it, overlap
    another or leave gaps, and the file must end where the last tensor ends.
    ``BOOL`` bytes must be 0 or 1.  When the file carries checksums (every
    file :func:`write_tensors` writes does), the header's is verified before
    any data is read and each tensor's as it is read; a mismatch names the
    tensor (or the header).  A file without checksums is read unverified,
    unless ``require_checksums`` is true, or is a callable that returns a
    true value when called with the file's metadata: then it is refused (a
    str returned by the callable is quoted in the error as the reason).

    Every violation raises :class:`CheckpointError` naming the file and the
    problem - for a file that is no safetensors file at all, also what it
    looks like (a ``torch.save`` zip archive or pickle, a text file, ...);
    I/O errors (e.g. a missing file) propagate as ``OSError``.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _error(path, "not a regular file")
        size = st.st_size
        head = f.read(_SNIFF_BYTES)
        header_len = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else None
        looks_like = _looks_like(head, size, header_len)
        if looks_like is not None:
            raise _error(path, f"not a safetensors file: {looks_like}")
        if header_len is None:
            raise _error(path, f"file is {len(head)} bytes long, shorter than "
                               f"the 8-byte header length field")
        if header_len > MAX_HEADER_BYTES:
            raise _error(path, f"header length {header_len} exceeds the limit "
                               f"of {MAX_HEADER_BYTES} bytes (corrupt file?)")
        if 8 + header_len > size:
            raise _error(path, f"header length {header_len} exceeds the file "
                               f"size ({size} bytes): file truncated or corrupt")
        data_len = size - 8 - header_len
        f.seek(8)
        header = _parse_header(_read_exact(f, header_len, path), path)
        metadata, layout = _check_header(header, data_len, path)
        checksums = _check_checksums(metadata, layout, path, require_checksums)

        tensors = {}
        data_start = 8 + header_len
        # Read in file order so the disk sees one sequential pass.
        for name, dtype, shape, begin, end in sorted(layout, key=lambda t: t[3]):
            try:
                arr = np.empty(shape, dtype=dtype.newbyteorder("="))
            except ValueError as exc:  # e.g. more dimensions than numpy allows
                raise _error(path, f"tensor {name!r}: shape {list(shape)} not "
                                   f"supported by numpy: {exc}") from None
            buf = arr.reshape(-1).view(np.uint8)
            if end > begin:
                f.seek(data_start + begin)
                got = f.readinto(buf)
                if got != end - begin:
                    # Only possible if the file shrank while we read it.
                    raise _error(path, f"tensor {name!r}: data truncated "
                                       f"({got} of {end - begin} bytes)")
            if checksums is not None:
                # Over the bytes as stored: before any byte swapping.
                crc = zlib.crc32(buf)
                if crc != checksums[name]:
                    raise _error(path, f"tensor {name!r}: checksum mismatch "
                                       f"(CRC-32 {_hex(crc)}, the file says "
                                       f"{_hex(checksums[name])}): its data is "
                                       f"damaged")
            if end > begin:
                if sys.byteorder == "big" and dtype.itemsize > 1:
                    arr.byteswap(inplace=True)
                if dtype.kind == "b" and arr.view(np.uint8).max() > 1:
                    raise _error(path, f"tensor {name!r}: BOOL data contains "
                                       f"bytes other than 0 and 1")
            tensors[name] = arr
    # Present tensors in header order, which is what the writer intended.
    order = {entry[0]: i for i, entry in enumerate(layout)}
    tensors = dict(sorted(tensors.items(), key=lambda kv: order[kv[0]]))
    return tensors, metadata


# How much of the file's start _looks_like sees.
_SNIFF_BYTES = 64


def _looks_like(head, size, header_len):
    """What a file that starts with ``head`` is, if it is clearly not a
    safetensors file; None otherwise (the normal checks then report it).

    A signature is trusted only where no plausible safetensors file, complete
    or truncated, starts with it, i.e. where the 8-byte header length it
    implies is absurd.
    """
    if size == 0:
        return ("the file is empty (0 bytes, shorter than the 8-byte header "
                "length field)")
    text = _as_text(head)
    if text is not None:  # no NUL among the first 8 bytes: length >= 2**56
        return f"it looks like a text file (it begins {text[:40]!r})"
    if header_len is None:
        return None
    if head.startswith(b"PK\x03\x04"):
        # Implies a header of 64 MiB (+ k * 4 GiB): only a complete one
        # that starts like JSON could be real.
        if not (header_len <= MAX_HEADER_BYTES and 8 + header_len <= size
                and head[8:9] == b"{"):
            return ("it looks like a zip archive, the format of torch.save "
                    "(and numpy.savez): load it with torch.load; netcl "
                    "checkpoints are safetensors files written by "
                    "netcl.optim.save")
        return None
    if header_len <= MAX_HEADER_BYTES:
        return None
    if head[0] == 0x80 and 2 <= head[1] <= 5:
        return ("it looks like a Python pickle, as written by a legacy "
                "torch.save (_use_new_zipfile_serialization=False) or "
                "pickle.dump; netcl never unpickles, its checkpoints are "
                "safetensors files written by netcl.optim.save")
    if head.startswith(b"\x93NUMPY"):
        return "it looks like a NumPy .npy file (numpy.save)"
    if head.startswith(b"\x1f\x8b"):
        return "it looks like a gzip-compressed file"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "it looks like an HDF5 file"
    return None


def _as_text(head):
    """``head`` decoded, if it looks like the start of a text file."""
    if not head or b"\0" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the end of ``head`` is fine.
        if exc.reason != "unexpected end of data" or exc.start < len(head) - 3:
            return None
        text = head[:exc.start].decode("utf-8")
    if not text or not all(c.isprintable() or c in "\t\n\r\f\v\ufeff"
                           for c in text):
        return None
    return text


def _error(path, what):
    return CheckpointError(f"{path}: {what}")


def _read_exact(f, n, path):
    data = f.read(n)
    if len(data) != n:
        raise _error(path, f"unexpected end of file ({len(data)} of {n} bytes)")
    return data


def _parse_header(raw, path):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _error(path, f"header is not valid UTF-8: {exc}") from None

    def no_duplicates(pairs):
        obj = {}
        for key, value in pairs:
            if key in obj:
                raise _error(path, f"header contains duplicate key {key!r}")
            obj[key] = value
        return obj

    def no_constant(token):
        raise _error(path, f"header contains non-JSON constant {token}")

    try:
        header = json.loads(text, object_pairs_hook=no_duplicates,
                            parse_constant=no_constant)
    except CheckpointError:
        raise
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and the int-digits limit;
        # RecursionError deeply nested arrays.
        raise _error(path, f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _error(path, f"header is a JSON {type(header).__name__}, "
                           f"not an object")
    return header


def _check_header(header, data_len, path):
    """Validate the parsed header; return (metadata, [(name, dtype, shape,
    begin, end)]) in header order."""
    metadata = header.get(_METADATA_KEY)
    if metadata is None:  # absent, or null as the reference reader allows
        metadata = {}
    elif not isinstance(metadata, dict) or not all(
            isinstance(v, str) for v in metadata.values()):
        raise _error(path, f"{_METADATA_KEY} must be a map of str to str, "
                           f"got {_short(metadata)}")

    layout = []
    for name, entry in header.items():
        if name == _METADATA_KEY:
            continue
        where = f"tensor {_short(name)}"
        if not name:
            raise _error(path, "tensor with an empty name")
        if not isinstance(entry, dict):
            raise _error(path, f"{where}: entry must be an object, "
                               f"got {_short(entry)}")
        missing = _ENTRY_KEYS - entry.keys()
        if missing:
            raise _error(path, f"{where}: missing {', '.join(sorted(missing))}")
        extra = entry.keys() - _ENTRY_KEYS
        if extra:
            raise _error(path, f"{where}: unexpected keys "
                               f"{', '.join(sorted(map(repr, extra)))}")

        dtype_name = entry["dtype"]
        if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
            if isinstance(dtype_name, str) and (
                    dtype_name in _UNREPRESENTABLE_DTYPES):
                raise _error(path, f"{where}: dtype {dtype_name} has no numpy "
                                   f"equivalent and cannot be read")
            raise _error(path, f"{where}: unknown dtype {_short(dtype_name)}")
        dtype = _DTYPES[dtype_name]

        shape = entry["shape"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0
                                                  for d in shape):
            raise _error(path, f"{where}: shape must be a list of "
                               f"non-negative integers, got {_short(shape)}")
        if any(d > sys.maxsize for d in shape):
            raise _error(path, f"{where}: shape {_short(shape)} too large")

        offsets = entry["data_offsets"]
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) and o >= 0 for o in offsets)
                or offsets[0] > offsets[1]):
            raise _error(path, f"{where}: data_offsets must be [begin, end] "
                               f"with 0 <= begin <= end, got {_short(offsets)}")
        begin, end = offsets
        if end > data_len:
            raise _error(path, f"{where}: data_offsets [{begin}, {end}] "
                               f"extend past the data region ({data_len} "
                               f"bytes): file truncated or corrupt")
        nbytes = _nbytes(shape, dtype.itemsize)
        if nbytes != end - begin:
            need = "more than 2**64" if nbytes is None else str(nbytes)
            raise _error(path, f"{where}: data_offsets [{begin}, {end}] span "
                               f"{end - begin} bytes but shape "
                               f"{_short(shape)} of {dtype_name} needs {need}")
        layout.append((name, dtype, tuple(shape), begin, end))

    # The tensors must tile [0, data_len) exactly: an overlap means two
    # tensors share bytes, a gap or tail means bytes nobody accounts for -
    # both signs of corruption (and rejected by the reference reader too).
    pos = 0
    prev = None
    for name, _dtype, _shape, begin, end in sorted(layout,
                                                   key=lambda t: (t[3], t[4])):
        if begin < pos:
            raise _error(path, f"tensor {_short(name)} (bytes {begin}-{end}) "
                               f"overlaps tensor {_short(prev)} "
                               f"(ending at {pos})")
        if begin > pos:
            raise _error(path, f"bytes {pos}-{begin} of the data region "
                               f"belong to no tensor")
        pos, prev = end, name
    if pos != data_len:
        raise _error(path, f"{data_len - pos} bytes left over after the last "
                           f"tensor (data region is {data_len} bytes, tensors "
                           f"end at {pos})")
    return metadata, layout


def _check_checksums(metadata, layout, path, require):
    """Remove the checksums entry from ``metadata``, validate it and check
    the header's CRC; return {tensor name: CRC}, or None for a file without
    checksums that may be read unverified."""
    text = metadata.pop(CHECKSUMS_KEY, None)
    if text is None:
        reason = require(metadata) if callable(require) else require
        if reason:
            because = f" ({reason})" if isinstance(reason, str) else ""
            raise _error(path, f"the file carries no checksums (its metadata has "
                               f"no {CHECKSUMS_KEY!r}), which it must{because}: it "
                               f"was not written by netcl, or its header was "
                               f"altered or damaged")
        return None
    where = f"metadata {CHECKSUMS_KEY!r}"
    try:
        checksums = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise _error(path, f"{where} is not valid JSON: {exc}") from None
    if not isinstance(checksums, dict) or set(checksums) != _CHECKSUM_FIELDS:
        raise _error(path, f"{where} must be an object with keys "
                           f"{sorted(_CHECKSUM_FIELDS)}, got {_short(checksums)}")
    algorithm = checksums["algorithm"]
    if algorithm != _CHECKSUM_ALGORITHM:
        raise _error(path, f"{where}: unknown checksum algorithm "
                           f"{_short(algorithm)} (this netcl knows "
                           f"{_CHECKSUM_ALGORITHM!r}; written by a newer netcl?)")
    per_tensor = checksums["tensors"]
    if not isinstance(per_tensor, dict):
        raise _error(path, f"{where}: 'tensors' must be an object, "
                           f"got {_short(per_tensor)}")
    names = {entry[0] for entry in layout}
    for name in per_tensor:
        if name not in names:
            raise _error(path, f"{where} has a checksum for tensor {_short(name)}, "
                               f"which the file does not contain")
    crcs = {}
    for name, *_ in layout:
        if name not in per_tensor:
            raise _error(path, f"tensor {_short(name)} has no checksum in {where}")
        crcs[name] = _parse_crc(per_tensor[name], f"tensor {_short(name)}", where, path)
    stored = _parse_crc(checksums["header"], "the header", where, path)
    computed = _header_crc(metadata, [
        (name, _name_of(dtype), shape, begin, end)
        for name, dtype, shape, begin, end in layout])
    if computed != stored:
        raise _error(path, f"header checksum mismatch (CRC-32 {_hex(computed)}, the "
                           f"file says {_hex(stored)}): its metadata or tensor "
                           f"layout was altered or damaged")
    return crcs


def _parse_crc(value, what, where, path):
    if (not isinstance(value, str) or len(value) != 8
            or any(c not in "0123456789abcdef" for c in value)):
        raise _error(path, f"{where}: the checksum of {what} must be 8 lowercase "
                           f"hex digits, got {_short(value)}")
    return int(value, 16)


def _no_constant(token):
    raise ValueError(f"non-JSON constant {token}")


def _is_int(x):
    # JSON true/false arrive as bool, a subclass of int.
    return type(x) is int


def _nbytes(shape, itemsize):
    """prod(shape) * itemsize, or None if that exceeds 2**64.

    Shapes come from an untrusted header: stopping early keeps a header with
    millions of huge dimensions from costing quadratic big-int arithmetic.
    """
    if 0 in shape:
        return 0
    n = itemsize
    for d in shape:
        n *= d
        if n > 1 << 64:
            return None
    return n


def _short(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
