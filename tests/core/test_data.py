"""Tests for energy_callbacks.data: IDX reading, directory loaders, digits, preprocessing."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from energy_callbacks.data import (
    FASHION_MNIST_DIR,
    IDXError,
    ImageDataset,
    load_digits,
    load_fashion_mnist,
    load_idx_dataset,
    one_hot,
    paper_inputs,
    read_idx,
)

_CODES = {
    np.dtype("u1"): 0x08,
    np.dtype("i1"): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
    """A standard IDX encoding of ``array`` (big-endian header and data)."""
    big = array.astype(array.dtype.newbyteorder(">"))
    header = struct.pack(">BBBB", 0, 0, _CODES[big.dtype], big.ndim)
    return header + struct.pack(f">{big.ndim}I", *big.shape) + big.tobytes()


def write_idx(path: Path, array: np.ndarray | bytes, *, gz: bool = False) -> Path:
    data = array if isinstance(array, bytes) else idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_dataset(
    directory: Path,
    n_train: int = 6,
    n_test: int = 4,
    *,
    prefix: str = "",
    gz: bool = True,
    size: tuple[int, int] = (3, 5),
    n_classes: int = 10,
) -> None:
    rng = np.random.default_rng(1)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, *size), dtype=np.uint8)
        labels = (np.arange(n) % n_classes).astype(np.uint8)
        write_idx(directory / f"{prefix}{split}-images-idx3-ubyte{suffix}", images, gz=gz)
        write_idx(directory / f"{prefix}{split}-labels-idx1-ubyte{suffix}", labels, gz=gz)


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path: Path, dtype: str, gz: bool) -> None:
    offset = 0 if np.dtype(dtype).kind == "u" else 20  # negative values for signed types
    array = (np.arange(24).reshape(2, 3, 4) * 3 - offset).astype(dtype)
    out = read_idx(write_idx(tmp_path / "a.idx", array, gz=gz))
    assert out.dtype == np.dtype(dtype).newbyteorder("=")
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, array)
    out[0, 0, 0] = 1  # the result is writeable


def test_gzip_detected_by_magic_not_extension(tmp_path: Path) -> None:
    array = np.arange(6, dtype=">i2").reshape(2, 3)
    gz_without_ext = write_idx(tmp_path / "plain-name", array, gz=True)
    raw_with_gz_ext = write_idx(tmp_path / "fake.gz", array, gz=False)
    np.testing.assert_array_equal(read_idx(gz_without_ext), array)
    np.testing.assert_array_equal(read_idx(raw_with_gz_ext), array)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_file(tmp_path: Path, gz: bool) -> None:
    data = idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))
    path = write_idx(tmp_path / "train-images-idx3-ubyte", data[:-10], gz=gz)
    with pytest.raises(IDXError, match="truncated") as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message and "4x28x28 uint8 = 3136 bytes" in message
    assert "file has 3126" in message


def test_truncated_header(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "h", b"\0\0\x08\x03\0\0\0\x02")
    with pytest.raises(IDXError, match="truncated"):
        read_idx(path)


def test_trailing_bytes(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "t", idx_bytes(np.zeros(5, dtype=np.uint8)) + b"xyz")
    with pytest.raises(IDXError, match="3 trailing bytes"):
        read_idx(path)


@pytest.mark.parametrize("magic", [b"", b"\x01\0\x08\x01", b"\0\0\x07\x01", b"\0\0\x08\x00"])
def test_bad_magic(tmp_path: Path, magic: bytes) -> None:
    path = write_idx(tmp_path / "m", magic + b"\0\0\0\0")
    with pytest.raises(IDXError, match="bad IDX magic") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_corrupt_gzip(tmp_path: Path) -> None:
    data = gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8)))
    path = write_idx(tmp_path / "c.gz", data[:12] + b"garbage" * 5)
    with pytest.raises(IDXError, match="gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_naming(tmp_path: Path, gz: bool) -> None:
    write_dataset(tmp_path, gz=gz)
    data = load_idx_dataset(tmp_path, name="toy")
    assert isinstance(data, ImageDataset)
    assert (data.name, data.n_classes) == ("toy", 10)
    assert data.train.images.shape == (6, 3, 5) and data.train.images.dtype == np.uint8
    assert data.test.labels.shape == (4,) and data.test.labels.dtype == np.int64
    assert load_idx_dataset(tmp_path).name == tmp_path.name


def test_count_mismatch(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3, dtype=np.uint8), gz=True)
    with pytest.raises(IDXError, match="4 images but .* 3 labels"):
        load_idx_dataset(tmp_path)


def test_label_out_of_range(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.full(6, 10, dtype=np.uint8), gz=True)
    with pytest.raises(IDXError, match=r"expected them in \[0, 10\)"):
        load_idx_dataset(tmp_path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as info:
        load_fashion_mnist(tmp_path / "nowhere")
    assert "train-images-idx3-ubyte" in str(info.value) and "--data-dir" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="Missing t10k-labels-idx1-ubyte") as info:
        load_idx_dataset(tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_idx_dataset(tmp_path)


def test_emnist_transposed_back(tmp_path: Path) -> None:
    upright = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)  # not symmetric
    labels = np.array([0, 46], dtype=np.uint8)
    for split in ("train", "t10k"):
        # EMNIST files hold each image transposed.
        write_idx(
            tmp_path / f"emnist-balanced-{split}-images-idx3-ubyte.gz",
            np.ascontiguousarray(upright.transpose(0, 2, 1)),
            gz=True,
        )
        write_idx(tmp_path / f"emnist-balanced-{split}-labels-idx1-ubyte", labels)
    data = load_idx_dataset(tmp_path)
    assert (data.name, data.n_classes) == ("emnist-balanced", 47)
    assert data.train.images.shape == (2, 3, 5)
    np.testing.assert_array_equal(data.train.images, upright)
    np.testing.assert_array_equal(data.test.labels, labels)
    assert data.train.images.flags.c_contiguous


def test_emnist_several_subsets(tmp_path: Path) -> None:
    write_dataset(tmp_path, prefix="emnist-digits-")
    write_dataset(tmp_path, prefix="emnist-letters-", n_classes=27)
    with pytest.raises(ValueError, match="digits, letters"):
        load_idx_dataset(tmp_path)
    data = load_idx_dataset(tmp_path, name="emnist-letters")
    assert (data.name, data.n_classes) == ("emnist-letters", 27)
    assert data.train.images.shape == (6, 5, 3)
    with pytest.raises(ValueError, match="emnist-byclass not found"):
        load_idx_dataset(tmp_path, name="emnist-byclass")


def test_digits() -> None:
    data = load_digits(test_fraction=0.25, seed=0)
    assert (data.name, data.n_classes) == ("digits", 10)
    n_train, n_test = len(data.train.labels), len(data.test.labels)
    assert n_train + n_test == 1797 and abs(n_test - 0.25 * 1797) < 10
    assert data.train.images.shape == (n_train, 8, 8) and data.train.images.dtype == np.uint8
    assert data.test.labels.dtype == np.int64
    assert data.train.images.max() == 255 and set(np.unique(data.test.labels)) == set(range(10))
    again = load_digits(test_fraction=0.25, seed=0)
    np.testing.assert_array_equal(again.test.images, data.test.images)
    np.testing.assert_array_equal(again.train.labels, data.train.labels)
    other = load_digits(test_fraction=0.25, seed=1)
    assert not np.array_equal(other.test.images, data.test.images)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)


def test_paper_inputs() -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(50, 4, 4), dtype=np.uint8)
    train[0] = 0
    train[1] = 255
    x, mean = paper_inputs(train)
    assert x.shape == (50, 16) and x.dtype == np.float32 and mean.dtype == np.float32
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose((x + mean).min(), 0.01, rtol=1e-6)
    np.testing.assert_allclose((x + mean).max(), 0.99, rtol=1e-6)

    test = rng.integers(0, 256, size=(7, 4, 4), dtype=np.uint8)
    x_test, mean_test = paper_inputs(test, mean)
    np.testing.assert_array_equal(mean_test, mean)
    expected = test.reshape(7, -1) / 255 * 0.98 + 0.01 - mean
    np.testing.assert_allclose(x_test, expected, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        paper_inputs(test, mean[:3])
    with pytest.raises(TypeError, match="uint8"):
        paper_inputs(test.astype(np.float32))


def test_one_hot() -> None:
    out = one_hot(np.array([2, 0, 1, 2]), 3)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.eye(3, dtype=np.float32)[[2, 0, 1, 2]])
    assert one_hot(np.array([], dtype=np.int64), 4).shape == (0, 4)
    with pytest.raises(ValueError, match="labels"):
        one_hot(np.array([3]), 3)


@pytest.mark.data
def test_real_fashion_mnist() -> None:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(
            f"Fashion-MNIST not in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)"
        )
    data = load_fashion_mnist()
    assert (data.name, data.n_classes) == ("fashion-mnist", 10)
    assert data.train.images.shape == (60000, 28, 28) and data.train.labels.shape == (60000,)
    assert data.test.images.shape == (10000, 28, 28) and data.test.labels.shape == (10000,)
    assert set(np.unique(data.train.labels)) == set(range(10))
