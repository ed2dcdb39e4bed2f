"""Tests for netcl.optim.checkpoint_file (safetensors reader/writer).

The module is loaded straight from its file so these tests need neither
OpenCL nor a working ``netcl/__init__.py``.
"""

import errno
import importlib.util
import json
import os
import random
import re
import signal
import struct
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from _kill import kill_mid_save
from _new_process import python_path

REPO = Path(__file__).resolve().parents[1]
MODULE_PATH = REPO / "netcl" / "optim" / "checkpoint_file.py"


def _load_module():
    spec = importlib.util.spec_from_file_location(
        "_netcl_checkpoint_file_under_test", MODULE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_CF = _load_module()
CheckpointError = _CF.CheckpointError


@pytest.fixture
def cf():
    return _CF


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def sample_tensors():
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.standard_normal(7),                     # float64
        "step": np.array(12345678901234, dtype=np.int64),  # 0-d
        "mask": rng.random((2, 3, 4)) > 0.5,
        "bytes": rng.integers(0, 256, 10, dtype=np.uint8),
        "empty": np.zeros((0,), dtype=np.float32),
        "i32": np.arange(-6, 6, dtype=np.int32).reshape(3, 4),
        "f16": np.array([1.5, -2.0, np.inf, np.nan], dtype=np.float16),
    }


def assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def raw_file(header, data=b"", pad=True, header_bytes=None):
    """Assemble a safetensors file by hand."""
    if header_bytes is None:
        header_bytes = json.dumps(header).encode("utf-8")
    if pad:
        header_bytes += b" " * (-len(header_bytes) % 8)
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


def f32_entry(shape, begin):
    n = int(np.prod(shape)) * 4
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, begin + n]}


def valid_bytes(cf, tmp_path):
    p = tmp_path / "valid.safetensors"
    cf.write_tensors(p, sample_tensors(), {"format": "np", "epoch": "3"})
    return p.read_bytes()


def expect_error(cf, tmp_path, content, *fragments):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        cf.read_tensors(p)
    msg = str(info.value)
    assert str(p) in msg, msg
    for fragment in fragments:
        assert fragment.lower() in msg.lower(), msg
    return msg


# --------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int64,
                                   np.int32, np.int16, np.int8, np.uint8,
                                   np.uint16, np.uint32, np.uint64, np.bool_,
                                   np.complex64])
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (3, 0, 2), (4, 5, 6)])
def test_round_trip_dtypes_shapes(cf, tmp_path, dtype, shape):
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, int(np.prod(shape)) * np.dtype(dtype).itemsize,
                       dtype=np.uint8)
    if dtype is np.bool_:
        raw = raw & 1
    arr = raw.view(dtype).reshape(shape)
    p = tmp_path / "x.safetensors"
    cf.write_tensors(p, {"x": arr}, {"k": "v"})
    got, meta = cf.read_tensors(p)
    assert_same(got, {"x": arr})
    assert meta == {"k": "v"}


def test_round_trip_mixed_and_metadata(cf, tmp_path):
    tensors = sample_tensors()
    meta = {"format": "netcl", "unicode": "ünï — 日本", "empty": "", "json": '{"a": [1]}'}
    p = tmp_path / "ckpt.safetensors"
    cf.write_tensors(p, tensors, meta)
    got, got_meta = cf.read_tensors(str(p))
    assert_same(got, tensors)
    assert got_meta == meta
    assert got["step"].shape == ()
    assert got["empty"].shape == (0,)


def test_round_trip_large(cf, tmp_path):
    rng = np.random.default_rng(2)
    tensors = {
        "big32": rng.standard_normal((1024, 1024)).astype(np.float32),
        "big64": rng.standard_normal(300_001),
        "idx": rng.integers(-2**62, 2**62, 100_003, dtype=np.int64),
        "flags": rng.random(99_999) > 0.3,
    }
    p = tmp_path / "large.safetensors"
    cf.write_tensors(p, tensors, {})
    got, meta = cf.read_tensors(p)
    assert_same(got, tensors)
    assert meta == {}


def test_no_tensors(cf, tmp_path):
    p = tmp_path / "none.safetensors"
    cf.write_tensors(p, {}, {"only": "metadata"})
    assert cf.read_tensors(p) == ({}, {"only": "metadata"})
    cf.write_tensors(p, {}, {})
    assert cf.read_tensors(p) == ({}, {})


def test_metadata_none_means_empty(cf, tmp_path):
    p = tmp_path / "m.safetensors"
    cf.write_tensors(p, {"a": np.ones(2)}, None)
    assert cf.read_tensors(p)[1] == {}


def test_non_native_and_non_contiguous_inputs(cf, tmp_path):
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    tensors = {
        "big_endian": np.arange(10, dtype=">i4"),
        "transposed": base.T,
        "strided": base[::2, ::3],
        "fortran": np.asfortranarray(base),
        "be_float": np.linspace(0, 1, 5).astype(">f8"),
    }
    p = tmp_path / "layout.safetensors"
    cf.write_tensors(p, tensors, {})
    got, _ = cf.read_tensors(p)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype.newbyteorder("=")
        assert got[k].dtype.isnative
        np.testing.assert_array_equal(got[k], v)


def test_read_arrays_are_owned_writable_native(cf, tmp_path):
    p = tmp_path / "own.safetensors"
    cf.write_tensors(p, sample_tensors(), {})
    got, _ = cf.read_tensors(p)
    for k, v in got.items():
        assert isinstance(v, np.ndarray), k
        assert v.flags.writeable and v.flags.owndata and v.flags.c_contiguous, k
        assert v.dtype.isnative, k
    got["w"][0, 0] = 42.0  # must not raise
    got["step"][()] = 1


def test_header_layout(cf, tmp_path):
    p = tmp_path / "layout.safetensors"
    cf.write_tensors(p, {"a": np.ones(3, np.uint8), "b": np.ones(2, np.float64),
                         "c": np.ones(1, np.int32)}, {"m": "1"})
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    # The user's metadata, plus the checksums write_tensors always adds.
    checksums = json.loads(header["__metadata__"].pop(cf.CHECKSUMS_KEY))
    assert header["__metadata__"] == {"m": "1"}
    assert checksums["algorithm"] == "crc32" and set(checksums["tensors"]) == set("abc")
    for name in "abc":
        info = header[name]
        begin, end = info["data_offsets"]
        itemsize = {"U8": 1, "F64": 8, "I32": 4}[info["dtype"]]
        assert begin % itemsize == 0  # every tensor naturally aligned
        data = raw[8 + n + begin:8 + n + end]
        assert checksums["tensors"][name] == f"{zlib.crc32(data):08x}"
    assert max(h["data_offsets"][1] for k, h in header.items()
               if k != "__metadata__") == len(raw) - 8 - n


def test_overwrite_and_pathlike(cf, tmp_path):
    p = tmp_path / "o.safetensors"
    cf.write_tensors(p, {"a": np.zeros(3)}, {"v": "1"})
    cf.write_tensors(os.fspath(p), {"b": np.ones(2, np.int32)}, {"v": "2"})
    got, meta = cf.read_tensors(p)
    assert list(got) == ["b"] and meta == {"v": "2"}
    assert os.listdir(tmp_path) == ["o.safetensors"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_file_mode_follows_umask(cf, tmp_path):
    old = os.umask(0o027)
    try:
        p = tmp_path / "mode.safetensors"
        cf.write_tensors(p, {"a": np.zeros(1)}, {})
    finally:
        os.umask(old)
    assert (p.stat().st_mode & 0o777) == 0o640


# --------------------------------------------------------------------------
# write-side validation
# --------------------------------------------------------------------------

@pytest.mark.parametrize("tensors, exc, fragment", [
    ({"": np.zeros(1)}, ValueError, "empty"),
    ({"__metadata__": np.zeros(1)}, ValueError, "__metadata__"),
    ({3: np.zeros(1)}, TypeError, "3"),
    ({"bad\ud800": np.zeros(1)}, ValueError, "unicode"),
    ({"objs": np.array([1, "a"], dtype=object)}, TypeError, "objs"),
    ({"c128": np.zeros(2, np.complex128)}, TypeError, "c128"),
    ({"strs": np.array(["a", "b"])}, TypeError, "strs"),
    ({"rec": np.zeros(2, dtype=[("a", "f4"), ("b", "i4")])}, TypeError, "rec"),
    ({"dt": np.zeros(2, dtype="datetime64[s]")}, TypeError, "dt"),
    ({"lst": [1.0, 2.0]}, TypeError, "lst"),
    ({"scalar": np.float32(1.0)}, TypeError, "scalar"),
])
def test_write_rejects_bad_tensors(cf, tmp_path, tensors, exc, fragment):
    p = tmp_path / "w.safetensors"
    # The bad entry comes after a good one: nothing at all may be written.
    with pytest.raises(exc) as info:
        cf.write_tensors(p, {"good": np.ones(4), **tensors}, {})
    assert fragment.lower() in str(info.value).lower()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("metadata", [{"a": 1}, {"a": None}, {1: "x"},
                                      {"a": b"bytes"}, ["a", "b"]])
def test_write_rejects_bad_metadata(cf, tmp_path, metadata):
    with pytest.raises(TypeError):
        cf.write_tensors(tmp_path / "w.safetensors", {"x": np.ones(1)}, metadata)
    assert os.listdir(tmp_path) == []


def test_write_rejects_non_mapping(cf, tmp_path):
    with pytest.raises(TypeError):
        cf.write_tensors(tmp_path / "w.safetensors", [("x", np.ones(1))], {})


def test_write_missing_directory(cf, tmp_path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(FileNotFoundError) as info:
        cf.write_tensors(missing / "x.safetensors", {"x": np.ones(1)}, {})
    assert str(missing) in str(info.value)
    assert not (tmp_path / "no").exists()


# --------------------------------------------------------------------------
# interoperability with the reference implementation
# --------------------------------------------------------------------------

def test_cross_check_with_safetensors(cf, tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    safetensors = pytest.importorskip("safetensors")
    tensors = sample_tensors()
    tensors["c64"] = np.array([1 + 2j, -3.5j], dtype=np.complex64)
    meta = {"format": "np", "note": "ünï"}

    ours = tmp_path / "ours.safetensors"
    cf.write_tensors(ours, tensors, meta)
    assert_same(st_numpy.load_file(str(ours)), tensors)
    with safetensors.safe_open(str(ours), framework="np") as f:
        # The reference reader sees netcl's checksums as one more entry.
        theirs_meta = f.metadata()
        assert json.loads(theirs_meta.pop(cf.CHECKSUMS_KEY))["algorithm"] == "crc32"
        assert theirs_meta == meta

    theirs = tmp_path / "theirs.safetensors"
    st_numpy.save_file(tensors, str(theirs), metadata=meta)
    got, got_meta = cf.read_tensors(theirs)
    assert_same(got, tensors)
    assert got_meta == meta

    # Without metadata the reference writer omits __metadata__ entirely.
    st_numpy.save_file({"x": np.ones(3, np.float32)}, str(theirs))
    got, got_meta = cf.read_tensors(theirs)
    assert got_meta == {} and got["x"].tolist() == [1, 1, 1]


# --------------------------------------------------------------------------
# corrupt files
# --------------------------------------------------------------------------

def test_missing_file_is_oserror(cf, tmp_path):
    with pytest.raises(FileNotFoundError):
        cf.read_tensors(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("content", [b"", b"\x01", b"\x00" * 7])
def test_too_short(cf, tmp_path, content):
    expect_error(cf, tmp_path, content, "shorter than")


def test_header_length_exceeds_file(cf, tmp_path):
    expect_error(cf, tmp_path, struct.pack("<Q", 100) + b"{}", "exceeds the file")


def test_header_length_absurd(cf, tmp_path):
    expect_error(cf, tmp_path, struct.pack("<Q", 2**63) + b"{}" + b" " * 6, "limit")
    expect_error(cf, tmp_path, struct.pack("<Q", 100_000_001) + b"{}", "limit")


def test_truncated_at_every_length(cf, tmp_path):
    good = valid_bytes(cf, tmp_path)
    for k in range(len(good)):
        p = tmp_path / "t.safetensors"
        p.write_bytes(good[:k])
        with pytest.raises(CheckpointError):
            cf.read_tensors(p)


def test_truncated_data_message(cf, tmp_path):
    good = valid_bytes(cf, tmp_path)
    expect_error(cf, tmp_path, good[:-3], "truncated")


def test_trailing_bytes(cf, tmp_path):
    good = valid_bytes(cf, tmp_path)
    expect_error(cf, tmp_path, good + b"\x00", "left over")


@pytest.mark.parametrize("header_bytes, fragment", [
    (b"\xff\xfe{}", "utf-8"),
    (b'{"a": ', "json"),
    (b"", "json"),
    (b"not json", "json"),
    (b"[]", "not an object"),
    (b'"str"', "not an object"),
    (b"42", "not an object"),
    (b"null", "not an object"),
    (b'{"__metadata__": {}, "__metadata__": {}}', "duplicate"),
    (b'{"__metadata__": {"a": "1", "a": "2"}}', "duplicate"),
    (b'{"__metadata__": {"x": NaN}}', "nan"),
    (b'{"x": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 0]}}',
     "infinity"),
    (b"[" * 100_000 + b"]" * 100_000, "json"),
    (b'{"x": ' + b"1" * 5000 + b"}", "json"),
])
def test_bad_header_json(cf, tmp_path, header_bytes, fragment):
    expect_error(cf, tmp_path, raw_file(None, header_bytes=header_bytes), fragment)


@pytest.mark.parametrize("metadata", [[], "s", 3, {"a": 1}, {"a": None},
                                      {"a": ["x"]}, {"a": {"b": "c"}}])
def test_bad_metadata(cf, tmp_path, metadata):
    expect_error(cf, tmp_path, raw_file({"__metadata__": metadata}), "__metadata__")


def test_null_metadata_is_empty(cf, tmp_path):
    p = tmp_path / "n.safetensors"
    p.write_bytes(raw_file({"__metadata__": None}))
    assert cf.read_tensors(p) == ({}, {})


DATA16 = bytes(range(16))


@pytest.mark.parametrize("entry, data, fragment", [
    ("scalar", DATA16, "entry must be an object"),
    ([1, 2], DATA16, "entry must be an object"),
    ({"shape": [4], "data_offsets": [0, 16]}, DATA16, "missing dtype"),
    ({"dtype": "F32", "data_offsets": [0, 16]}, DATA16, "missing shape"),
    ({"dtype": "F32", "shape": [4]}, DATA16, "missing data_offsets"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "x": 1}, DATA16,
     "unexpected"),
    ({"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}, DATA16,
     "unknown dtype"),
    ({"dtype": "f32", "shape": [4], "data_offsets": [0, 16]}, DATA16,
     "unknown dtype"),
    ({"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}, DATA16,
     "unknown dtype"),
    ({"dtype": None, "shape": [4], "data_offsets": [0, 16]}, DATA16,
     "unknown dtype"),
    ({"dtype": "F8_E4M3", "shape": [16], "data_offsets": [0, 16]}, DATA16,
     "no numpy equivalent"),
    ({"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}, DATA16, "shape"),
    ({"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}, DATA16, "shape"),
    ({"dtype": "F32", "shape": [2.5], "data_offsets": [0, 16]}, DATA16, "shape"),
    ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, DATA16[:4], "shape"),
    ({"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}, DATA16, "shape"),
    ({"dtype": "F32", "shape": None, "data_offsets": [0, 16]}, DATA16, "shape"),
    ({"dtype": "F32", "shape": [2**70, 0], "data_offsets": [0, 0]}, b"",
     "too large"),
    ({"dtype": "F32", "shape": [1] * 100, "data_offsets": [0, 4]}, DATA16[:4],
     "not supported by numpy"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0]}, DATA16, "data_offsets"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 8, 16]}, DATA16,
     "data_offsets"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}, DATA16,
     "data_offsets"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}, DATA16,
     "data_offsets"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]}, DATA16,
     "data_offsets"),
    ({"dtype": "F32", "shape": [4], "data_offsets": "0-16"}, DATA16,
     "data_offsets"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}, DATA16[:12],
     "needs 16"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}, DATA16[:12],
     "needs 16"),
    ({"dtype": "F64", "shape": [4], "data_offsets": [0, 16]}, DATA16, "needs"),
    ({"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}, DATA16,
     "needs more"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 32]}, DATA16,
     "past the data region"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [2**64, 2**64 + 16]}, DATA16,
     "past the data region"),
    ({"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}, b"\x01\x02",
     "bool"),
])
def test_bad_tensor_entry(cf, tmp_path, entry, data, fragment):
    msg = expect_error(cf, tmp_path, raw_file({"t": entry}, data), fragment)
    if isinstance(entry, dict) and fragment not in ("bool",):
        assert "'t'" in msg  # names the tensor


def test_empty_tensor_name(cf, tmp_path):
    expect_error(cf, tmp_path, raw_file({"": f32_entry([1], 0)}, DATA16[:4]),
                 "empty name")


def test_overlapping_tensors(cf, tmp_path):
    header = {"a": f32_entry([3], 0), "b": f32_entry([2], 8)}  # [0,12) [8,16)
    expect_error(cf, tmp_path, raw_file(header, DATA16), "overlaps")
    header = {"a": f32_entry([4], 0), "b": f32_entry([4], 0)}   # identical
    expect_error(cf, tmp_path, raw_file(header, DATA16), "overlaps")
    header = {"a": f32_entry([4], 0), "b": f32_entry([0], 8)}   # empty inside
    expect_error(cf, tmp_path, raw_file(header, DATA16), "overlaps")


def test_gap_between_tensors(cf, tmp_path):
    header = {"a": f32_entry([1], 0), "b": f32_entry([2], 8)}  # 4..8 unused
    expect_error(cf, tmp_path, raw_file(header, DATA16), "belong to no tensor")
    header = {"b": f32_entry([2], 8)}                          # 0..8 unused
    expect_error(cf, tmp_path, raw_file(header, DATA16), "belong to no tensor")


def test_data_but_no_tensors(cf, tmp_path):
    expect_error(cf, tmp_path, raw_file({}, b"\x00" * 8), "left over")


def test_hand_built_valid_file(cf, tmp_path):
    # Unpadded header, tensors listed out of offset order, empty tensors at
    # the boundaries: all valid.
    data = np.arange(4, dtype="<f4").tobytes() + np.array([7], "<i8").tobytes()
    header = {"z": {"dtype": "I64", "shape": [], "data_offsets": [16, 24]},
              "a": f32_entry([2, 2], 0),
              "e0": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]},
              "e1": {"dtype": "F64", "shape": [0, 3], "data_offsets": [24, 24]},
              "__metadata__": {"k": "v"}}
    p = tmp_path / "h.safetensors"
    p.write_bytes(raw_file(header, data, pad=False))
    got, meta = cf.read_tensors(p)
    assert list(got) == ["z", "a", "e0", "e1"]  # header order
    assert got["z"].shape == () and int(got["z"]) == 7
    assert got["a"].tolist() == [[0, 1], [2, 3]]
    assert got["e1"].shape == (0, 3) and got["e1"].dtype == np.float64
    assert meta == {"k": "v"}


def test_directory_is_oserror(cf, tmp_path):
    with pytest.raises(IsADirectoryError):
        cf.read_tensors(tmp_path)


# --------------------------------------------------------------------------
# fuzzing
# --------------------------------------------------------------------------

def _read_only_checkpoint_errors(cf, path):
    try:
        tensors, meta = cf.read_tensors(path)
    except CheckpointError:
        return False
    assert isinstance(meta, dict)
    assert all(isinstance(v, np.ndarray) for v in tensors.values())
    return True


def test_fuzz_random_byte_mutations(cf, tmp_path):
    good = valid_bytes(cf, tmp_path)
    (n,) = struct.unpack("<Q", good[:8])
    rng = random.Random(1234)
    p = tmp_path / "fuzz.safetensors"
    outcomes = {True: 0, False: 0}
    for _ in range(400):
        buf = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            # Bias towards the header: mutations of the data region only
            # change values, which is not detectable (nor meant to be).
            region = min(8 + n, len(buf)) if rng.random() < 0.85 else len(buf)
            pos = rng.randrange(region)
            if op < 0.4:
                buf[pos] = rng.randrange(256)
            elif op < 0.55:
                buf[pos] ^= 1 << rng.randrange(8)
            elif op < 0.7:
                del buf[pos:pos + rng.randint(1, 16)]
            elif op < 0.8:
                buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            elif op < 0.9:
                buf = buf[:rng.randrange(len(buf) + 1)]
            else:  # printable-ASCII mutation: more likely to stay valid JSON
                buf[pos] = ord(rng.choice('0123456789[]{}",:- eE.tfn'))
            if not buf:
                break
        p.write_bytes(bytes(buf))
        outcomes[_read_only_checkpoint_errors(cf, p)] += 1
    assert outcomes[False] > 100  # the fuzzer does reach the validation


def test_fuzz_structured_header_mutations(cf, tmp_path):
    good = valid_bytes(cf, tmp_path)
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + n])
    data = good[8 + n:]
    rng = random.Random(99)
    weird = [None, True, False, 0, -1, 1, 2**64, 2**31 - 1, 1.5, -0.0, "", "F32",
             "BF16", "I64", [], [0], [0, 0], [-1, 3], [1, 2, 3], {}, {"a": "b"},
             "__metadata__", [2**63, 2**63 + 8], [0.5]]
    p = tmp_path / "sfuzz.safetensors"
    for _ in range(300):
        h = json.loads(json.dumps(header))
        for _ in range(rng.randint(1, 3)):
            name = rng.choice(list(h))
            if (name == "__metadata__" or not isinstance(h[name], dict)
                    or rng.random() < 0.1):
                h[name] = rng.choice(weird) if rng.random() < 0.5 else {
                    "k": rng.choice(weird)}
            else:
                field = rng.choice(["dtype", "shape", "data_offsets", "extra"])
                if rng.random() < 0.15:
                    h[name].pop(field, None)
                elif (field == "data_offsets" and rng.random() < 0.5
                      and isinstance(h[name].get(field), list)
                      and len(h[name][field]) == 2):
                    b, e = h[name]["data_offsets"]
                    d = rng.randint(-8, 8)
                    h[name]["data_offsets"] = [b + d, e + rng.choice([0, d])]
                else:
                    h[name][field] = rng.choice(weird)
        trunc = rng.random() < 0.2
        p.write_bytes(raw_file(h, data[:-4] if trunc else data,
                               pad=rng.random() < 0.5))
        _read_only_checkpoint_errors(cf, p)


# --------------------------------------------------------------------------
# atomicity
# --------------------------------------------------------------------------

def test_fsync_failure_keeps_old_file(cf, tmp_path, monkeypatch):
    p = tmp_path / "a.safetensors"
    old = {"a": np.arange(5.0)}
    cf.write_tensors(p, old, {"v": "old"})
    before = p.read_bytes()

    def boom(fd):
        raise OSError(errno.EIO, "simulated fsync failure")

    monkeypatch.setattr(cf.os, "fsync", boom)
    with pytest.raises(OSError, match="simulated fsync"):
        cf.write_tensors(p, {"b": np.ones(1000)}, {"v": "new"})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]
    assert p.read_bytes() == before
    got, meta = cf.read_tensors(p)
    assert_same(got, old) and meta == {"v": "old"}


def test_disk_full_mid_write_keeps_old_file(cf, tmp_path, monkeypatch):
    p = tmp_path / "a.safetensors"
    cf.write_tensors(p, {"a": np.arange(5.0)}, {"v": "old"})
    before = p.read_bytes()
    real_fdopen = os.fdopen

    class FullDisk:
        """A file object that runs out of space after 1000 bytes."""

        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, b):
            self.written += memoryview(b).nbytes
            if self.written > 1000:
                raise OSError(errno.ENOSPC, "No space left on device (simulated)")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(cf.os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match="No space"):
        cf.write_tensors(p, {"b": np.ones(10_000)}, {"v": "new"})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]
    assert p.read_bytes() == before


def test_replace_failure_keeps_old_file(cf, tmp_path, monkeypatch):
    p = tmp_path / "a.safetensors"
    cf.write_tensors(p, {"a": np.arange(5.0)}, {"v": "old"})
    before = p.read_bytes()

    def boom(src, dst):
        raise PermissionError(errno.EACCES, "simulated replace failure")

    monkeypatch.setattr(cf.os, "replace", boom)
    with pytest.raises(PermissionError):
        cf.write_tensors(p, {"b": np.ones(3)}, {})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]
    assert p.read_bytes() == before


def test_keyboard_interrupt_cleans_up(cf, tmp_path, monkeypatch):
    p = tmp_path / "a.safetensors"
    monkeypatch.setattr(cf.os, "fsync",
                        lambda fd: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        cf.write_tensors(p, {"b": np.ones(3)}, {})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_target_is_directory_cleans_up(cf, tmp_path):
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    with pytest.raises(OSError):
        cf.write_tensors(d, {"b": np.ones(3)}, {})
    assert sorted(os.listdir(tmp_path)) == ["dir.safetensors"]
    assert os.listdir(d) == []


_KILL_CHILD = textwrap.dedent("""
    import importlib.util, os, sys, time
    import numpy as np
    spec = importlib.util.spec_from_file_location("cf_child", sys.argv[1])
    cf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cf)
    path = sys.argv[2]
    # Checkpoint B: 32 x 4 MiB, big enough that writing takes a while.
    big = {"t%03d" % i: np.full(1 << 20, i, np.float32) for i in range(32)}
    cf.write_tensors(path, {"a": np.arange(10.0), "s": np.array(3, np.int64)},
                     {"which": "A"})
    print("A-written", flush=True)
    # Should the parent be slow to notice the temporary file, hold the
    # writer before its fsync/rename so the kill still lands mid-save.
    os.fsync = lambda fd: time.sleep(3600)
    cf.write_tensors(path, big, {"which": "B"})
    print("B-written", flush=True)
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_save_keeps_previous_checkpoint(cf, tmp_path):
    path = tmp_path / "ckpt.safetensors"
    env = dict(os.environ, PYTHONPATH=python_path())
    tmp = kill_mid_save([sys.executable, "-c", _KILL_CHILD, str(MODULE_PATH), str(path)], env,
                        tmp_path, "A-written", ".ckpt.safetensors.", timeout=60)
    full_size = 8 + 32 * 4 * (1 << 20)
    print(f"killed with {tmp.stat().st_size} of >{full_size} bytes written")

    got, meta = cf.read_tensors(path)
    assert meta == {"which": "A"}
    assert_same(got, {"a": np.arange(10.0), "s": np.array(3, np.int64)})
    # The stale temporary file is left behind (nobody could remove it) and
    # is hidden, named after the checkpoint.
    assert tmp.name.startswith(".ckpt.safetensors.") and tmp.exists()
    # A new save still works next to it.
    cf.write_tensors(path, {"c": np.ones(2)}, {"which": "C"})
    assert cf.read_tensors(path)[1] == {"which": "C"}


# --------------------------------------------------------------------------
# checksums
# --------------------------------------------------------------------------

def split_file(raw):
    """(header dict, data bytes) of a file's bytes."""
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def without_checksums(raw):
    """The file as netcl wrote it before checksums existed: the same bytes
    with the checksums entry (and a then empty __metadata__) left out."""
    header, data = split_file(raw)
    del header["__metadata__"][CHECKSUMS_KEY]
    if not header["__metadata__"]:
        del header["__metadata__"]
    body = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return raw_file(None, data, header_bytes=body)


def with_checksums(raw, edit):
    """``raw`` with its checksums entry replaced by ``edit(parsed entry)``,
    or by ``edit`` itself when it is a str."""
    header, data = split_file(raw)
    meta = header["__metadata__"]
    if isinstance(edit, str):
        meta[CHECKSUMS_KEY] = edit
    else:
        entry = json.loads(meta[CHECKSUMS_KEY])
        edit(entry)
        meta[CHECKSUMS_KEY] = json.dumps(entry)
    return raw_file(header, data)


CHECKSUMS_KEY = "netcl.checksums"


def test_checksums_key(cf):
    assert cf.CHECKSUMS_KEY == CHECKSUMS_KEY


def test_every_file_carries_crc32_of_each_tensor_and_the_header(cf, tmp_path):
    raw = valid_bytes(cf, tmp_path)
    header, data = split_file(raw)
    entry = json.loads(header["__metadata__"].pop(CHECKSUMS_KEY))
    assert set(entry) == {"algorithm", "header", "tensors"}
    assert entry["algorithm"] == "crc32"
    names = set(header) - {"__metadata__"}
    assert set(entry["tensors"]) == names == set(sample_tensors())
    for name in names:
        begin, end = header[name]["data_offsets"]
        assert entry["tensors"][name] == f"{zlib.crc32(data[begin:end]):08x}", name
    canonical = {"metadata": header["__metadata__"],
                 "tensors": {name: [header[name]["dtype"], header[name]["shape"],
                                    *header[name]["data_offsets"]] for name in names}}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    assert entry["header"] == f"{zlib.crc32(text.encode('ascii')):08x}"


def flip_bit(raw, position, bit):
    buf = bytearray(raw)
    buf[position] ^= 1 << bit
    return bytes(buf)


def test_flipped_bit_in_any_tensor_is_refused_naming_it(cf, tmp_path):
    """Every dtype, 0-d and n-d, first/middle/last byte, low and high bit;
    BOOL's low bit (0 <-> 1) included, which nothing else would notice."""
    raw = valid_bytes(cf, tmp_path)
    header, _ = split_file(raw)
    start = len(raw) - len(split_file(raw)[1])
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if begin == end:
            continue
        for position in sorted({begin, (begin + end) // 2, end - 1}):
            for bit in (0, 7):
                msg = expect_error(cf, tmp_path, flip_bit(raw, start + position, bit),
                                   f"tensor {name!r}: checksum mismatch", "damaged")
                assert msg.count("tensor ") == 1, msg  # names this tensor only


@pytest.mark.skipif(not hasattr(os, "pwrite"), reason="needs os.pwrite")
def test_every_single_bit_flip_in_the_file_is_refused(cf, tmp_path):
    """Header length, header (metadata, layout, checksums, padding) and data:
    no single flipped bit goes unnoticed when checksums are required."""
    p = tmp_path / "small.safetensors"
    cf.write_tensors(p, {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
                         "b": np.array([True, False]), "s": np.array(7, np.int64)},
                     {"format": "netcl.optim", "lr": "0.02"})
    raw = p.read_bytes()
    fd = os.open(p, os.O_WRONLY)
    try:
        for position in range(len(raw)):
            for bit in range(8):
                os.pwrite(fd, bytes([raw[position] ^ 1 << bit]), position)
                with pytest.raises(CheckpointError, match=re.escape(str(p))):
                    cf.read_tensors(p, require_checksums=True)
            os.pwrite(fd, raw[position:position + 1], position)
    finally:
        os.close(fd)
    assert p.read_bytes() == raw


def test_edited_header_is_refused(cf, tmp_path):
    """A metadata value, a metadata key or a layout change that keeps the file
    well-formed is caught by the header's checksum, before any data is read."""
    raw = valid_bytes(cf, tmp_path)
    for old, new in [(b'"epoch":"3"', b'"epoch":"4"'), (b'"format"', b'"formax"'),
                     (b'"shape":[3,5]', b'"shape":[5,3]')]:
        assert raw.count(old) == 1
        expect_error(cf, tmp_path, raw.replace(old, new), "header checksum mismatch",
                     "altered or damaged")


def test_truncated_file_is_refused(cf, tmp_path):
    raw = valid_bytes(cf, tmp_path)
    header, data = split_file(raw)
    # Cut inside the data, inside the header, inside the length field, to nothing.
    expect_error(cf, tmp_path, raw[:-1], "truncated")
    expect_error(cf, tmp_path, raw[:len(raw) - len(data) - 5], "exceeds the file size",
                 "truncated")
    expect_error(cf, tmp_path, raw[:5], "5 bytes long, shorter than")
    expect_error(cf, tmp_path, b"", "not a safetensors file", "empty")
    # Cut and then "repaired": the last tensor shortened to what is left and the
    # header rewritten to match. Well-formed, but the header's checksum says no.
    last = max((n for n in header if n != "__metadata__"),
               key=lambda n: header[n]["data_offsets"][0])
    assert header[last]["dtype"] == "BOOL" and header[last]["shape"] == [2, 3, 4]
    header[last]["shape"] = [1, 3, 4]
    header[last]["data_offsets"][1] -= 12
    expect_error(cf, tmp_path, raw_file(header, data[:-12]), "header checksum mismatch")


def test_files_without_checksums_read_unverified_unless_required(cf, tmp_path):
    """Files from the reference writer or from netcl before checksums."""
    old = without_checksums(valid_bytes(cf, tmp_path))
    p = tmp_path / "old.safetensors"
    p.write_bytes(old)
    got, meta = cf.read_tensors(p)
    assert_same(got, sample_tensors())
    assert meta == {"format": "np", "epoch": "3"}
    # Unverified: damaged data goes unnoticed in such a file.
    p.write_bytes(old[:-1] + bytes([old[-1] ^ 1]))
    cf.read_tensors(p)
    with pytest.raises(CheckpointError, match="carries no checksums"):
        cf.read_tensors(p, require_checksums=True)
    seen = []

    def require(metadata):
        seen.append(metadata)
        return "files of format 'np' always do"

    with pytest.raises(CheckpointError, match=r"\(files of format 'np' always do\)"):
        cf.read_tensors(p, require_checksums=require)
    assert seen == [{"format": "np", "epoch": "3"}]
    assert cf.read_tensors(p, require_checksums=lambda m: None)[1]["epoch"] == "3"
    # Files with checksums satisfy the requirement (the callable is not asked).
    cf.write_tensors(p, sample_tensors(), {})
    assert_same(cf.read_tensors(p, require_checksums=require)[0], sample_tensors())
    assert len(seen) == 1


def test_checksums_survive_round_trips_bit_exactly(cf, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    cf.write_tensors(a, sample_tensors(), {"format": "np"})
    tensors, meta = cf.read_tensors(a)
    assert CHECKSUMS_KEY not in meta  # netcl's own entry, not the caller's
    cf.write_tensors(b, tensors, meta)
    assert a.read_bytes() == b.read_bytes()
    # An edited tensor gets a fresh checksum: read-modify-write just works.
    tensors["w"][0, 0] += 1
    cf.write_tensors(b, tensors, meta)
    assert cf.read_tensors(b)[0]["w"][0, 0] == tensors["w"][0, 0]


def test_checksums_key_is_reserved(cf, tmp_path):
    with pytest.raises(ValueError, match="netcl.checksums.*reserved"):
        cf.write_tensors(tmp_path / "w.safetensors", {"x": np.ones(1)},
                         {CHECKSUMS_KEY: "{}"})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("edit, fragment", [
    ("not json", "'netcl.checksums' is not valid json"),
    ("[]", "must be an object with keys"),
    (lambda e: e.pop("header"), "must be an object with keys"),
    (lambda e: e.update(extra=1), "must be an object with keys"),
    (lambda e: e.update(algorithm="sha256"), "unknown checksum algorithm 'sha256'"),
    (lambda e: e.update(tensors=[]), "'tensors' must be an object"),
    (lambda e: e["tensors"].pop("w"), "tensor 'w' has no checksum"),
    (lambda e: e["tensors"].update(ghost="00000000"), "checksum for tensor 'ghost'"),
    (lambda e: e["tensors"].update(w=e["tensors"]["w"].upper()), "8 lowercase hex"),
    (lambda e: e["tensors"].update(w=12345678), "8 lowercase hex"),
    (lambda e: e.update(header="0"), "8 lowercase hex"),
])
def test_malformed_checksums_entry(cf, tmp_path, edit, fragment):
    raw = valid_bytes(cf, tmp_path)
    expect_error(cf, tmp_path, with_checksums(raw, edit), fragment)


# --------------------------------------------------------------------------
# files that are no safetensors file at all
# --------------------------------------------------------------------------

def test_torch_save_files_are_named(cf, tmp_path):
    torch = pytest.importorskip("torch")
    state = {"state": {0: {"square_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}
    p = tmp_path / "opt.pt"
    torch.save(state, p)
    assert p.read_bytes().startswith(b"PK\x03\x04")
    with pytest.raises(CheckpointError,
                       match=r"opt.pt: not a safetensors file: it looks like a zip archive, "
                             r"the format of torch.save.*netcl.optim.save"):
        cf.read_tensors(p)
    torch.save(state, p, _use_new_zipfile_serialization=False)
    assert p.read_bytes().startswith(b"\x80\x02")
    with pytest.raises(CheckpointError, match=r"opt.pt: not a safetensors file: it looks like "
                                              r"a Python pickle.*legacy torch.save"):
        cf.read_tensors(p)


@pytest.mark.parametrize("content, fragment", [
    (b"", "the file is empty"),
    (b"step,loss\n1,0.5\n", "a text file (it begins 'step,loss\\n1,0.5\\n')"),
    ('{"lr": 0.1, "note": "ünï"}'.encode() * 5, "a text file (it begins '{\"lr\": 0.1"),
    (b"hi", "a text file (it begins 'hi')"),
    (b"\xef\xbb\xbfBOM and a cut multi-byte char \xe6\x97", "a text file"),
    (b"\x80\x04\x95\x0a\x00\x00\x00\x00\x00\x00\x00}\x94.", "a python pickle"),
    (b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'", "numpy .npy"),
    (b"\x1f\x8b\x08\x00\x12\x34\x56\x78\x00\x03", "gzip"),
    (b"PK\x03\x04\x14\x00\x00\x00\x08\x00", "zip archive"),
])
def test_not_a_safetensors_file(cf, tmp_path, content, fragment):
    expect_error(cf, tmp_path, content, "not a safetensors file: ", fragment)


def test_truncated_safetensors_is_not_mistaken_for_a_pickle(cf, tmp_path):
    """A header of 640..1535 bytes starts the file with b"\\x80\\x02".."\\x05"
    like a pickle: cut short, it is still reported as a truncated file."""
    header = {"__metadata__": {"pad": ""}, "x": f32_entry([4], 0)}
    header["__metadata__"]["pad"] = "x" * (640 - len(json.dumps(header)))
    raw = raw_file(header, np.arange(4, dtype="<f4").tobytes())
    assert raw[:8] == struct.pack("<Q", 640) and raw[:2] == b"\x80\x02"
    p = tmp_path / "ok.safetensors"
    p.write_bytes(raw)
    assert cf.read_tensors(p)[0]["x"].tolist() == [0, 1, 2, 3]
    for k in (8, 100, len(raw) - 1):
        msg = expect_error(cf, tmp_path, raw[:k], "truncated")
        assert "pickle" not in msg
