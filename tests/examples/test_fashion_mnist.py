"""The Fashion-MNIST loader of the examples (`examples/fashion_mnist.py`), on synthetic idx files.

The files are written by hand from the idx format (`conftest.idx_bytes`), a few hundred records,
in Debian's flat layout and torchvision's `FashionMNIST/raw` layout, gzip-compressed and plain.
Nothing is installed or downloaded: every call passes `install=False, download=False`.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from fashion_mnist import (
    FashionMNISTNotFound,
    augment,
    load_fashion_mnist,
    normalize,
    read_idx,
    stratified_split,
)

pytestmark = pytest.mark.examples


def load(folder: Path, **kwargs):
    return load_fashion_mnist([folder], install=False, download=False, check_sizes=False, **kwargs)


def test_debian_and_torchvision_layouts_parse_identically(tmp_path: Path, fashion_writer):
    arrays = fashion_writer(tmp_path / "debian", "debian", gz=True, n_train=300, n_test=100)
    fashion_writer(tmp_path / "tv-plain", "torchvision", gz=False, n_train=300, n_test=100)
    fashion_writer(tmp_path / "tv-gz", "torchvision", gz=True, n_train=300, n_test=100)
    loaded = [load(tmp_path / name) for name in ("debian", "tv-plain", "tv-gz")]
    (train_images, train_labels), (test_images, test_labels) = arrays["train"], arrays["test"]
    for data in loaded:
        assert data.train_images.dtype == torch.uint8 and data.train_images.shape == (300, 28, 28)
        assert data.train_labels.dtype == torch.int64 and data.test_images.shape == (100, 28, 28)
        assert torch.equal(data.train_images, torch.from_numpy(train_images))
        assert torch.equal(data.train_labels, torch.from_numpy(train_labels).long())
        assert torch.equal(data.test_images, torch.from_numpy(test_images))
        assert torch.equal(data.test_labels, torch.from_numpy(test_labels).long())
    assert loaded[0].source == tmp_path / "debian"


def test_first_directory_holding_the_files_wins(tmp_path: Path, fashion_writer):
    fashion_writer(tmp_path / "b", "torchvision", n_train=50, n_test=20)
    data = load_fashion_mnist([tmp_path / "a", tmp_path / "b"], install=False, download=False, check_sizes=False)
    assert data.source == tmp_path / "b" and len(data.train_labels) == 50


def test_official_sizes_are_checked(tmp_path: Path, fashion_writer):
    fashion_writer(tmp_path, n_train=300, n_test=100)
    with pytest.raises(ValueError, match="expected 60000"):
        load_fashion_mnist([tmp_path], install=False, download=False)


def test_read_idx_rejects_broken_files(tmp_path: Path, fashion_writer):
    fashion_writer(tmp_path, gz=False, n_train=30, n_test=10)
    good = (tmp_path / "t10k-labels-idx1-ubyte").read_bytes()
    assert read_idx(tmp_path / "t10k-labels-idx1-ubyte").tolist() == list(range(10))
    cases = {
        "magic": b"\x01\x00" + good[2:],
        "type": good[:2] + b"\x07" + good[3:],
        "truncated": good[:-1],
        "header": good[:6],
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.idx"
        path.write_bytes(data)
        with pytest.raises(ValueError):
            read_idx(path)
    # a gzip file is recognised by its suffix
    (tmp_path / "labels.gz").write_bytes(gzip.compress(good))
    assert read_idx(tmp_path / "labels.gz").tolist() == list(range(10))


def test_labels_and_shapes_are_checked(tmp_path: Path, fashion_writer, fashion_split_writer):
    write_split = fashion_split_writer
    arrays = fashion_writer(tmp_path, n_train=30, n_test=10)
    images, labels = arrays["test"]
    bad_labels = labels.copy()
    bad_labels[3] = 10
    write_split(tmp_path, "test", images, bad_labels, gz=True)
    with pytest.raises(ValueError, match=r"labels outside 0\.\.9"):
        load(tmp_path)
    write_split(tmp_path, "test", images, labels[:-1], gz=True)
    with pytest.raises(ValueError, match="labels for 10 images"):
        load(tmp_path)
    write_split(tmp_path, "test", np.zeros((10, 32, 32), np.uint8), labels, gz=True)
    with pytest.raises(ValueError, match=r"\[N, 28, 28\]"):
        load(tmp_path)


def test_missing_data_names_both_ways_to_get_it(tmp_path: Path):
    with pytest.raises(FashionMNISTNotFound) as error:
        load(tmp_path / "nothing-here")
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "pip install torchvision" in message
    assert str(tmp_path / "nothing-here") in message
    assert isinstance(error.value, FileNotFoundError)


def test_augment_and_splits():
    generator = torch.Generator().manual_seed(0)
    x = normalize(torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8))
    assert torch.equal(augment(x, generator, pad=0, flip=False), x)
    flipped = augment(x, torch.Generator().manual_seed(0), pad=0, flip=True)
    assert all(torch.equal(f, a) or torch.equal(f, a.flip(-1)) for f, a in zip(flipped, x, strict=True))
    cropped = augment(x, generator)
    assert cropped.shape == x.shape
    # the same seed gives the same augmentation
    assert torch.equal(augment(x, torch.Generator().manual_seed(3)), augment(x, torch.Generator().manual_seed(3)))
    labels = torch.arange(300) % 10
    chosen, rest = stratified_split(labels, 7, seed=0)
    assert torch.equal(labels[chosen].bincount(), torch.full((10,), 7))
    assert len(rest) == 230 and not set(chosen.tolist()) & set(rest.tolist())
    assert torch.equal(chosen, stratified_split(labels, 7, seed=0)[0])
