"""Framework-free data loaders (NumPy only, never touches the network).

* :func:`read_idx` reads one IDX file (the MNIST format), gzipped or raw, and validates it
  (:func:`parse_idx` does the same for bytes).
* :func:`load_idx_dataset` / :func:`load_fashion_mnist` load an MNIST-style directory
  (MNIST, Fashion-MNIST, EMNIST naming); Fashion-MNIST comes from the Debian package
  ``dataset-fashion-mnist`` at :data:`FASHION_MNIST_DIR`.
* :func:`load_digits` wraps scikit-learn's bundled 8x8 digits (needs scikit-learn).
* :func:`paper_inputs` and :func:`one_hot` reproduce the reference experiment's preprocessing.

Every loader returns uint8 images (0..255) and int64 labels.
"""

from __future__ import annotations

import gzip
import io
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_TYPE_NAMES = {
    0x08: "uint8",
    0x09: "int8",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}
_FIX = "re-download the file or re-install dataset-fashion-mnist"
_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_EMNIST_RE = re.compile(r"^emnist-(.+)-train-images-idx3-ubyte(\.gz)?$")
# EMNIST "letters" labels run 1..26, so class 0 is unused there.
_EMNIST_CLASSES = {
    "balanced": 47,
    "byclass": 62,
    "bymerge": 47,
    "digits": 10,
    "letters": 27,
    "mnist": 10,
}


class IDXError(ValueError):
    """A data file is corrupt, truncated, or inconsistent with its partner file."""


@dataclass(frozen=True)
class Split:
    """One split: ``images`` uint8 of shape (n, H, W), ``labels`` int64 of shape (n,)."""

    images: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class ImageDataset:
    """Train and test splits; labels lie in ``[0, n_classes)``."""

    name: str
    train: Split
    test: Split
    n_classes: int


MAX_NDIM = 32
"""The most dimensions an IDX file may declare here (data sets use 1 to 4; NumPy holds 64)."""

_CHUNK = 1 << 24


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip detected by its magic bytes) into a native-endian array.

    Raises :class:`IDXError` for a bad magic number, corrupt gzip, or a data section whose
    length differs from what the header announces (truncated or trailing bytes).
    """
    path = Path(path)
    return parse_idx(path.read_bytes(), str(path))


def parse_idx(raw: bytes, name: str = "IDX data") -> np.ndarray:
    """:func:`read_idx` on the bytes of a file; ``name`` is what the errors call it.

    Any input gives either the array its header describes or :class:`IDXError`. A
    gzipped file is decompressed as it is read, never past what the header announces
    (the rest is only counted), so a corrupt or hostile file cannot make it allocate
    more than the array it claims to hold.
    """
    source = _Source(raw, name)
    head = source.read(4)
    if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_TYPES or head[3] < 1:
        raise IDXError(
            f"{name} has a bad IDX magic number {head.hex() or '(empty file)'}: expected "
            f"00 00, a type code in {{{', '.join(f'{t:02x}' for t in _IDX_TYPES)}}} and "
            f"ndim >= 1; {_FIX}"
        )
    code, ndim = head[2], head[3]
    if ndim > MAX_NDIM:
        raise IDXError(f"{name} declares {ndim} dimensions, more than {MAX_NDIM}; {_FIX}")
    dims = source.read(4 * ndim)
    header = 4 + 4 * ndim
    if len(dims) < 4 * ndim:
        raise IDXError(
            f"{name} is truncated: the header needs {header} bytes for {ndim} "
            f"dimensions, file has {4 + len(dims)}; {_FIX}"
        )
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
    dtype = _IDX_TYPES[code]
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if math.prod(d for d in shape if d) * dtype.itemsize > np.iinfo(np.intp).max:
        raise IDXError(
            f"{name} declares dimensions {'x'.join(map(str, shape))}, too large for any "
            f"array (even an empty one); {_FIX}"
        )
    data = source.read(expected)
    got = len(data) + source.count_rest()
    if got != expected:
        what = "is truncated" if got < expected else f"has {got - expected} trailing bytes"
        raise IDXError(
            f"{name} {what}: header says {'x'.join(map(str, shape))} {_TYPE_NAMES[code]} = "
            f"{expected} bytes of data, file has {got}; {_FIX}"
        )
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


class _Source:
    """The bytes of an IDX file, decompressed on the fly when they are gzipped."""

    def __init__(self, raw: bytes, name: str) -> None:
        self.name = name
        self.raw = memoryview(raw)
        self.at = 0
        self.stream = gzip.GzipFile(fileobj=io.BytesIO(raw)) if raw[:2] == b"\x1f\x8b" else None

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer at the end)."""
        if self.stream is None:
            out = bytes(self.raw[self.at : self.at + n])
            self.at += len(out)
            return out
        parts, left = [], n
        while left > 0:
            part = self._chunk(min(left, _CHUNK))
            if not part:
                break
            parts.append(part)
            left -= len(part)
        return b"".join(parts)

    def count_rest(self) -> int:
        """How many bytes are left (read and dropped, to check a gzip stream to its end)."""
        if self.stream is None:
            return len(self.raw) - self.at
        total = 0
        while part := self._chunk(_CHUNK):
            total += len(part)
        return total

    def _chunk(self, n: int) -> bytes:
        assert self.stream is not None
        try:
            return self.stream.read(n)
        except (OSError, EOFError, zlib.error) as exc:
            raise IDXError(f"{self.name} is not a valid gzip file ({exc}); {_FIX}") from exc


def _locate(directory: Path, stems: list[str]) -> list[Path]:
    """Each stem as ``stem.gz`` or ``stem`` in ``directory``; FileNotFoundError if any lacks."""
    found = {stem: _find(directory, stem) for stem in stems}
    missing = [stem for stem, path in found.items() if path is None]
    if missing:
        raise _not_found(directory, f"Missing {', '.join(missing)}", stems)
    return [path for path in found.values() if path is not None]


def _find(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _not_found(directory: Path, problem: str, looked_for: list[str]) -> FileNotFoundError:
    return FileNotFoundError(
        f"{problem} in {directory}: looked for {', '.join(looked_for)} (each optionally "
        f"gzipped with .gz). Install Fashion-MNIST with `apt-get install dataset-fashion-mnist` "
        f"(it lands in {FASHION_MNIST_DIR}) or pass --data-dir pointing at a directory that "
        f"holds these files."
    )


def _load_split(images_path: Path, labels_path: Path, n_classes: int | None) -> Split:
    """Read and cross-check one split; ``n_classes=None`` only checks labels are >= 0."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise IDXError(
            f"{images_path} holds {images.dtype} data of shape {images.shape}; "
            f"expected uint8 images of shape (n, height, width)"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise IDXError(
            f"{labels_path} holds {labels.dtype} data of shape {labels.shape}; "
            f"expected integer labels of shape (n,)"
        )
    if len(images) != len(labels):
        raise IDXError(
            f"{images_path} has {len(images)} images but {labels_path} has "
            f"{len(labels)} labels; expected the same count"
        )
    upper = np.inf if n_classes is None else n_classes
    if labels.size and (labels.min() < 0 or labels.max() >= upper):
        raise IDXError(
            f"{labels_path} has labels in [{labels.min()}, {labels.max()}]; "
            f"expected them in [0, {n_classes or 'inf'})"
        )
    return Split(images=images, labels=labels.astype(np.int64))


def load_idx_dataset(data_dir: str | Path, *, name: str | None = None) -> ImageDataset:
    """Load the four IDX files of an MNIST-style data set from ``data_dir``.

    Understands MNIST/Fashion-MNIST naming (``train-images-idx3-ubyte[.gz]`` ...; 10 classes,
    ``name`` defaults to the directory name) and EMNIST naming
    (``emnist-<subset>-train-images-idx3-ubyte[.gz]`` ...; select a subset with
    ``name="emnist-<subset>"`` when several are present). EMNIST stores each image transposed
    in its IDX files; this loader transposes them back so they display upright like MNIST.
    EMNIST "letters" uses labels 1..26, so its ``n_classes`` is 27 with class 0 unused.
    """
    directory = Path(data_dir)
    if not directory.is_dir():
        raise _not_found(directory, "No such directory", list(_STEMS))
    subsets = sorted({m[1] for p in directory.iterdir() if (m := _EMNIST_RE.match(p.name))})
    wants_emnist = name is not None and name.startswith("emnist-")
    if not wants_emnist and (_find(directory, _STEMS[0]) is not None or not subsets):
        paths = _locate(directory, list(_STEMS))
        train, test = _load_split(paths[0], paths[1], 10), _load_split(paths[2], paths[3], 10)
        return ImageDataset(name or directory.name, train, test, 10)
    if name is not None and wants_emnist:
        subset = name.removeprefix("emnist-")
        if subset not in subsets:
            raise ValueError(
                f"{name} not found in {directory}; EMNIST subsets present: "
                f"{', '.join(subsets) or 'none'}"
            )
    elif len(subsets) == 1:
        subset = subsets[0]
    else:
        raise ValueError(
            f"{directory} holds several EMNIST subsets ({', '.join(subsets)}); "
            f"choose one with name='emnist-<subset>'"
        )
    paths = _locate(directory, [f"emnist-{subset}-{stem}" for stem in _STEMS])
    n_classes = _EMNIST_CLASSES.get(subset)
    splits = [_load_split(paths[i], paths[i + 1], n_classes) for i in (0, 2)]
    if n_classes is None:  # unknown subset: infer from the labels
        n_classes = 1 + max(int(s.labels.max(initial=0)) for s in splits)
    train, test = (
        Split(np.ascontiguousarray(s.images.transpose(0, 2, 1)), s.labels) for s in splits
    )
    return ImageDataset(f"emnist-{subset}", train, test, n_classes)


def load_fashion_mnist(data_dir: str | Path = FASHION_MNIST_DIR) -> ImageDataset:
    """Fashion-MNIST (60000 train / 10000 test 28x28 images, 10 classes) from local files."""
    return load_idx_dataset(data_dir, name="fashion-mnist")


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (1797 images), split stratified by class.

    Pixel values 0..16 are rescaled to uint8 0..255 (``v * 255 // 16``). The split depends
    only on ``seed``; each split keeps the original sample order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits as sk_load_digits  # type: ignore[import-untyped]

    bunch = sk_load_digits()
    images = (bunch.images.astype(np.int64) * 255 // 16).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        is_test[members[: round(test_fraction * len(members))]] = True
    return ImageDataset(
        name="digits",
        train=Split(images[~is_test], labels[~is_test]),
        test=Split(images[is_test], labels[is_test]),
        n_classes=10,
    )


def paper_inputs(
    images: np.ndarray, mean: np.ndarray | None = None, *, per_pixel: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Flatten uint8 images, scale 0..255 to [0.01, 0.99] as float32, subtract ``mean``.

    ``mean`` defaults to the mean of ``images``, one value per feature (``per_pixel``) or
    one value over all pixels (``per_pixel=False``, the authors' reference code): compute
    it on the training images and pass it in for the test images. Returns
    ``(inputs, mean)``.
    """
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images (0..255), got {images.dtype}")
    x = images.reshape(len(images), -1).astype(np.float32) / np.float32(255.0)
    x = x * np.float32(0.98) + np.float32(0.01)
    if mean is None:
        axis = 0 if per_pixel else None
        mean = np.asarray(x.mean(axis=axis, dtype=np.float64), dtype=np.float32)
    elif mean.shape not in (x.shape[1:], ()):
        raise ValueError(f"mean has shape {mean.shape}, expected ({x.shape[1]},) or ()")
    mean = np.asarray(mean, dtype=np.float32)
    return x - mean, mean


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Float32 one-hot matrix of shape (len(labels), n_classes)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"labels must lie in [0, {n_classes}), got [{labels.min()}, {labels.max()}]"
        )
    return np.eye(n_classes, dtype=np.float32)[labels.astype(np.intp)]
