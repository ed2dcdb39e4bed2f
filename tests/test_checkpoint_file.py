"""Tests for netcl.optim.checkpoint_file (safetensors reader/writer).

The module is loaded straight from its file so these tests need neither
OpenCL nor a working ``netcl/__init__.py``.
"""

import errno
import importlib.util
import json
import os
import random
import signal
import struct
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from _kill import kill_mid_save

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
    assert header["__metadata__"] == {"m": "1"}
    for name in "abc":
        info = header[name]
        begin, end = info["data_offsets"]
        itemsize = {"U8": 1, "F64": 8, "I32": 4}[info["dtype"]]
        assert begin % itemsize == 0  # every tensor naturally aligned
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
        assert f.metadata() == meta

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
    ({"dtype": "BF16", "shape": [8], "data_offsets": [0, 16]}, DATA16,
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
    env = dict(os.environ, PYTHONPATH=str(REPO))
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
