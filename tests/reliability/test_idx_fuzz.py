"""Bad input, the IDX loader: truncated files, wrong magic numbers, dimension headers that
do not match the data and corrupt gzip each give IDXError, never a wrong array.

Hypothesis feeds :func:`parse_idx` (what :func:`read_idx` runs on a file's bytes) 10,000
inputs: valid files of every IDX type, raw or gzipped, cut short, extended, with bytes
flipped, header fields rewritten or the gzip stream damaged, and plain random bytes. Each
result must equal what an independent decoder (below, from the IDX format) reads, or be
IDXError where that decoder finds the input invalid; any other exception fails the test.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from energy_callbacks.data import MAX_NDIM, IDXError, parse_idx, read_idx

TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def fuzz(n: int) -> settings:
    return settings(
        max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )


def encode(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(TYPES[code]).tobytes()


def reference(raw: bytes) -> np.ndarray | None:
    """The IDX format read plainly; None where the input is not a valid IDX file."""
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error):
            return None
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in TYPES or not 1 <= raw[3] <= MAX_NDIM:
        return None
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        return None
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(TYPES[raw[2]])
    if math.prod(d for d in shape if d) * dtype.itemsize >= 2**63:  # no NumPy array
        return None
    if len(raw) - 4 - 4 * ndim != math.prod(shape) * dtype.itemsize:
        return None
    return np.frombuffer(raw[4 + 4 * ndim :], dtype=dtype).reshape(shape)


def agree(raw: bytes) -> str:
    want = reference(raw)
    try:
        got = parse_idx(raw, "fuzz.idx")
    except IDXError as exc:
        assert want is None, f"a valid file was refused: {exc}"
        assert "fuzz.idx" in str(exc)
        return "refused"
    assert want is not None, "an invalid file was read as an array"
    assert got.shape == want.shape and got.dtype == want.dtype.newbyteorder("=")
    assert got.dtype.isnative and got.tobytes() == want.astype(got.dtype).tobytes()
    return "read"


@st.composite
def idx_files(draw) -> bytes:
    code = draw(st.sampled_from(sorted(TYPES)))
    shape = draw(st.lists(st.integers(0, 4), min_size=1, max_size=4))
    size = math.prod(shape) * np.dtype(TYPES[code]).itemsize
    data = draw(st.binary(min_size=size, max_size=size))  # any bit pattern, NaNs included
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + data


@st.composite
def damaged(draw) -> bytes:
    raw = draw(idx_files())
    zipped = draw(st.booleans())
    if zipped:
        raw = gzip.compress(raw, compresslevel=draw(st.integers(0, 9)), mtime=0)
    how = draw(st.sampled_from(["none", "cut", "extend", "flip", "header", "field"]))
    data = bytearray(raw)
    if how == "cut":
        del data[draw(st.integers(0, max(0, len(data) - 1))) :]
    elif how == "extend":
        data += draw(st.binary(min_size=1, max_size=16))
    elif how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
    elif how in ("header", "field") and not zipped:
        if how == "header":  # the type code or the number of dimensions
            data[draw(st.sampled_from([0, 1, 2, 3]))] = draw(st.integers(0, 255))
        elif len(data) >= 8:  # one dimension: no longer what the data holds
            whole = 0 < data[3] and len(data) >= 4 + 4 * data[3]
            d = draw(st.integers(0, data[3] - 1)) if whole else 0
            data[4 + 4 * d : 8 + 4 * d] = struct.pack(">I", draw(st.integers(0, 2**32 - 1)))
    return bytes(data)


OUTCOMES: dict[str, int] = {"read": 0, "refused": 0}


@fuzz(7_000)
@given(raw=damaged())
def test_damaged_files_give_the_array_or_idx_error(raw):
    OUTCOMES[agree(raw)] += 1


@fuzz(3_000)
@given(
    raw=st.one_of(
        st.binary(max_size=64),
        st.binary(max_size=64).map(lambda b: b"\0\0" + b),
        st.binary(max_size=64).map(lambda b: b"\x1f\x8b" + b),
        st.binary(max_size=40).map(lambda b: gzip.compress(b, mtime=0)),
    )
)
def test_random_bytes_give_idx_error_or_a_valid_array(raw):
    OUTCOMES[agree(raw)] += 1


def test_both_outcomes_were_reached():
    if not sum(OUTCOMES.values()):
        pytest.skip("runs after the fuzz tests of this file (pytest --dist loadfile)")
    assert OUTCOMES["read"] > 500 and OUTCOMES["refused"] > 500, OUTCOMES


def zipped(raw: bytes) -> bytes:
    return gzip.compress(raw, mtime=0)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (bytes([0, 0, 8, 200]) + b"\0" * 800, "200 dimensions"),
        (bytes([0, 0, 8, 2]) + struct.pack(">2I", 2**31, 2**31), "truncated"),
        (bytes([0, 0, 8, 3]) + struct.pack(">3I", 0, 2**32 - 1, 2**32 - 1), "too large for any"),
        (zipped(encode(np.zeros(3, np.uint8), 8)) + b"\0\0junk", "gzip"),
        (zipped(encode(np.zeros(3, np.uint8), 8))[:-4], "gzip"),
        (zipped(encode(np.zeros(3, np.uint8), 8) + b"x"), "1 trailing bytes"),
    ],
    ids=["ndim", "huge", "empty huge", "gzip junk", "gzip cut", "gzip trailing"],
)
def test_hostile_headers_are_refused_without_allocating_what_they_claim(raw, match):
    with pytest.raises(IDXError, match=match):
        parse_idx(raw)


def test_a_gzip_bomb_is_read_only_as_far_as_its_header_claims(tmp_path):
    """4 bytes of data announced, 200 MB of zeros behind them: counted in chunks, refused."""
    bomb = gzip.compress(encode(np.zeros(4, np.uint8), 8) + bytes(200_000_000), mtime=0)
    path = tmp_path / "bomb.gz"
    path.write_bytes(bomb)
    with pytest.raises(IDXError, match="200000000 trailing bytes"):
        read_idx(path)
