"""Fixtures of the example tests: a synthetic Fashion-MNIST written as idx files."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

#: (images file, labels file) of each split, as in the official release.
NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte idx file, written by hand from the format (not by the code under test):
    magic `00 00 08 ndim`, each dimension as a big-endian uint32, then the bytes row-major."""
    assert array.dtype == np.uint8
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in zip(NAMES[split], (images, labels), strict=True):
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


def synthetic_arrays(n_train: int = 300, n_test: int = 100, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random 28×28 images; labels cycling through the 10 classes (so every class has n/10)."""
    rng = np.random.default_rng(seed)
    return {
        split: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8))
        for split, n in (("train", n_train), ("test", n_test))
    }


@pytest.fixture
def fashion_writer() -> Callable[..., dict[str, tuple[np.ndarray, np.ndarray]]]:
    """`write(folder, layout="debian"|"torchvision", gz=True, **sizes)` → the arrays it wrote.

    Debian's layout is flat (`folder/*-ubyte.gz`); torchvision's is `folder/FashionMNIST/raw/*-ubyte[.gz]`.
    """

    def write(folder: Path, layout: str = "debian", gz: bool = True, **sizes: int):
        arrays = synthetic_arrays(**sizes)
        target = folder if layout == "debian" else folder / "FashionMNIST" / "raw"
        for split, (images, labels) in arrays.items():
            write_split(target, split, images, labels, gz)
        return arrays

    return write


@pytest.fixture
def fashion_split_writer() -> Callable[[Path, str, np.ndarray, np.ndarray, bool], None]:
    """`write(folder, split, images, labels, gz)`: one split's two idx files, flat in `folder`."""
    return write_split
