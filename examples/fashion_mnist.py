"""Fashion-MNIST for the examples: an idx-file loader, tensor batches, augmentation and a CNN-9.

Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017; MIT licence) has 60,000 training and 10,000 test
grey 28×28 images of clothing in 10 classes. It is read from the original idx files, either

* Debian's package `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist/*-ubyte.gz`), which
  `load_fashion_mnist` installs with `apt-get` when it is missing and the process runs as root on
  a system with `apt-get` (a Debian CI image), or
* torchvision's layout (`<root>/FashionMNIST/raw/*-ubyte` or `*-ubyte.gz`), which
  `torchvision.datasets.FashionMNIST(root, download=True)` writes for users who are online;
  torchvision is imported only for that fallback (it is not a dependency of this project).

Nothing here belongs to `lightning_hsu`: the study (`examples/fashion_study.py`) uses the package
only through its public API. The examples import this file as `fashion_mnist` (Python puts a
script's own folder on `sys.path`).
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

#: Where Debian's `dataset-fashion-mnist` puts the original files.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
#: Where the torchvision fallback downloads to (its files land in `<root>/FashionMNIST/raw`).
DOWNLOAD_ROOT = Path(os.environ.get("FASHION_MNIST_ROOT", Path.home() / ".cache" / "fashion-mnist"))
#: The four files, by split: (images, labels).
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: The official sizes.
SIZES = {"train": 60_000, "test": 10_000}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
#: Pixel mean and standard deviation of the training images (in [0, 1]).
MEAN, STD = 0.2860, 0.3530

#: idx type codes (third byte of the magic number) → (torch dtype, bytes per element, big-endian numpy type).
_IDX_TYPES = {
    0x08: (torch.uint8, 1, ">u1"),
    0x09: (torch.int8, 1, ">i1"),
    0x0B: (torch.int16, 2, ">i2"),
    0x0C: (torch.int32, 4, ">i4"),
    0x0D: (torch.float32, 4, ">f4"),
    0x0E: (torch.float64, 8, ">f8"),
}


class FashionMNISTNotFound(FileNotFoundError):
    """Neither the Debian package nor a torchvision download provided the files."""


def read_idx(path: Path) -> torch.Tensor:
    """Parse one idx file (plain or gzip-compressed) into a tensor of its type and shape.

    The format (LeCun's MNIST page): two zero bytes, a type code (0x08 = unsigned byte), the number
    of dimensions, then each dimension as a big-endian 32-bit integer, then the data, row-major.
    Raises `ValueError` when the magic number, type or size does not check out.
    """
    import numpy as np

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (magic number {raw[:4].hex() or 'missing'})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        raise ValueError(f"{path}: unknown idx type code 0x{code:02x}")
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated header ({ndim} dimensions)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype, itemsize, np_type = _IDX_TYPES[code]
    expected = 4 + 4 * ndim + itemsize * int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, expected {expected} for shape {shape}")
    array = np.frombuffer(raw, dtype=np_type, offset=4 + 4 * ndim).reshape(shape)
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="))).to(dtype)


def _find(directory: Path, name: str) -> Path | None:
    """`directory/name` or `directory/name.gz`, or the same under torchvision's `FashionMNIST/raw`."""
    for folder in (directory, directory / "FashionMNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_split(directory: Path, split: str, expected_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(images [N, 28, 28] uint8, labels [N] int64)` of one split found in `directory`.

    Checks that the images are 28×28 unsigned bytes, that there are as many labels as images, that
    the labels lie in 0..9 and, given `expected_size`, that there are that many images.
    """
    image_name, label_name = FILES[split]
    image_path, label_path = _find(directory, image_name), _find(directory, label_name)
    if image_path is None or label_path is None:
        raise FashionMNISTNotFound(f"{directory}: no {image_name}[.gz] / {label_name}[.gz]")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise ValueError(f"{image_path}: expected [N, 28, 28] unsigned bytes, got {tuple(images.shape)} {images.dtype}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{label_path}: {tuple(labels.shape)} labels for {images.shape[0]} images")
    if expected_size is not None and images.shape[0] != expected_size:
        raise ValueError(f"{image_path}: {images.shape[0]} images, expected {expected_size}")
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise ValueError(f"{label_path}: labels outside 0..9 ({int(labels.min())}..{int(labels.max())})")
    return images, labels


@dataclass
class FashionMNIST:
    """The two splits as tensors: images `[N, 28, 28]` uint8, labels `[N]` int64."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: Path


def read_directory(directory: Path, check_sizes: bool = True) -> FashionMNIST:
    """Both splits from one directory (Debian's flat layout or torchvision's `FashionMNIST/raw`)."""
    train = read_split(directory, "train", SIZES["train"] if check_sizes else None)
    test = read_split(directory, "test", SIZES["test"] if check_sizes else None)
    return FashionMNIST(*train, *test, source=Path(directory))


def _apt_install() -> str:
    """Install Debian's package; returns what happened (for the error message when it fails)."""
    if shutil.which("apt-get") is None:
        return "apt-get not available"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root, so apt-get was not tried"
    proc = subprocess.run(["apt-get", "install", "-y", "-q", DEBIAN_PACKAGE], capture_output=True, text=True)
    if proc.returncode != 0:  # a fresh image has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True)
        proc = subprocess.run(["apt-get", "install", "-y", "-q", DEBIAN_PACKAGE], capture_output=True, text=True)
    return "installed" if proc.returncode == 0 else f"apt-get install failed: {proc.stderr.strip()[-300:]}"


def _torchvision_download(root: Path) -> str:
    """Download with torchvision into `root/FashionMNIST/raw`; returns what happened."""
    try:
        from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST  # optional, lazy
    except ImportError:
        return "torchvision is not installed"
    try:
        TorchvisionFashionMNIST(str(root), train=True, download=True)
        TorchvisionFashionMNIST(str(root), train=False, download=True)
    except Exception as error:  # offline, mirror down, ...
        return f"torchvision download failed: {error}"
    return "downloaded"


def load_fashion_mnist(
    directories: Sequence[Path] | None = None,
    *,
    install: bool = True,
    download: bool = True,
    download_root: Path = DOWNLOAD_ROOT,
    check_sizes: bool = True,
) -> FashionMNIST:
    """Fashion-MNIST from the first of `directories` that holds it, fetching it if none does.

    Args:
        directories: where to look (default: Debian's `/usr/share/datasets/fashion-mnist`, then
            `download_root`); each in the Debian flat layout or torchvision's `FashionMNIST/raw`.
        install: when missing, `apt-get install dataset-fashion-mnist` (root and `apt-get` only).
        download: when still missing, `torchvision.datasets.FashionMNIST(download_root, download=True)`.
        download_root: the torchvision fallback's root (env `FASHION_MNIST_ROOT` sets the default).
        check_sizes: require the official 60,000 / 10,000 images.

    Raises:
        FashionMNISTNotFound: no directory holds the files and neither way of fetching them worked;
            the message names both.
    """
    directories = [Path(d) for d in (directories if directories is not None else (DEBIAN_DIR, download_root))]

    def first_found() -> FashionMNIST | None:
        for directory in directories:
            if _find(directory, FILES["train"][0]) is not None:
                return read_directory(directory, check_sizes)
        return None

    data = first_found()
    attempts = []
    if data is None and install:
        attempts.append(f"apt-get: {_apt_install()}")
        directories.insert(0, DEBIAN_DIR)
        data = first_found()
    if data is None and download:
        attempts.append(f"torchvision: {_torchvision_download(download_root)}")
        directories.append(download_root)
        data = first_found()
    if data is None:
        tried = "; ".join(attempts) or "fetching disabled"
        raise FashionMNISTNotFound(
            f"Fashion-MNIST not found in {[str(d) for d in directories]} ({tried}). Get it either way:\n"
            f"  * Debian/Ubuntu: `sudo apt-get install {DEBIAN_PACKAGE}` (files in {DEBIAN_DIR}), or\n"
            f"  * online: `pip install torchvision` and rerun (it downloads to {download_root}/FashionMNIST/raw;"
            " set FASHION_MNIST_ROOT to choose another folder)."
        )
    return data


# -- training pieces ---------------------------------------------------------------------------


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 `[N, 28, 28]` → float `[N, 1, 28, 28]`, standardised with the training set's mean and std."""
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)


def augment(
    images: torch.Tensor, generator: torch.Generator, pad: int = 2, flip: bool = True, fill: float = -MEAN / STD
) -> torch.Tensor:
    """Random crop (pad by `pad` with `fill`, the normalised black background, crop back) and random
    horizontal flip, per image.

    Vectorised on the batch `[B, 1, H, W]` (on its device); the randomness comes from `generator`
    (a CPU generator: the same seed gives the same augmentation on every device).
    """
    b, _, h, w = images.shape
    padded = nn.functional.pad(images, (pad, pad, pad, pad), value=fill)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(images.device)
    rows = dy[:, None] + torch.arange(h, device=images.device)  # [B, H]
    cols = dx[:, None] + torch.arange(w, device=images.device)  # [B, W]
    if flip:
        flipped = (torch.rand(b, generator=generator) < 0.5).to(images.device)
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded[batch, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


class TensorBatches:
    """Mini-batches of in-memory tensors, shuffled by a seeded generator; a batch is one indexing.

    Much cheaper than a `DataLoader` over a `TensorDataset`, which indexes and collates image by
    image. Lightning iterates it like a loader (it has `__len__` and `__iter__`); the tensors may
    live on a GPU, so that no batch is ever copied.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0
    ) -> None:
        self.images, self.labels, self.batch_size, self.shuffle = images, labels, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.labels.device)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.images[index], self.labels[index]


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    """3×3 convolution (no bias: BatchNorm follows), BatchNorm, ReLU."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class CNN9(pl.LightningModule):
    """The papers' plain CNN-9, VGG-style: 3 stages of 3 conv-BN-ReLU and a max-pool, a hidden fc, the classifier.

    On 28×28 inputs the stages give 14×14, 7×7 and 3×3 maps; the hidden fc (`fc`, ReLU) maps the
    flattened `widths[2]·9` features to `hidden`, and `classifier` (the last `nn.Linear`) to the 10
    classes. The convolutions are named `stage{1,2,3}.{0,3,6}` and are hidden layers for the
    regulariser, as is `fc`.

    Training follows the MHE CIFAR protocol (Liu et al., NeurIPS 2018): SGD with momentum 0.9 and
    weight decay 5e-4, cosine decay of the learning rate to zero over `max_steps_hint` steps, and
    random-crop (pad 2) + horizontal-flip augmentation done on the batch tensor. The augmentation's
    generator is seeded by `seed`, like the initialisation and the order.

    Args:
        widths: channels of the three stages (the papers use 64/128/256; the CPU study 16/32/64).
        hidden: width of the hidden fc layer.
        lr, momentum, weight_decay: SGD.
        max_steps_hint: optimizer steps of the cosine decay (the whole run).
        seed: seed of the augmentation.
        augment_data: random crop + flip on training batches.
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64),
        hidden: int = 128,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        max_steps_hint: int = 1000,
        seed: int = 0,
        augment_data: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr, self.momentum, self.weight_decay, self.max_steps_hint = lr, momentum, weight_decay, max_steps_hint
        self.augment_data = augment_data
        self.generator = torch.Generator().manual_seed(seed)
        c1, c2, c3 = widths
        self.stage1 = nn.Sequential(*conv_bn_relu(1, c1), *conv_bn_relu(c1, c1), *conv_bn_relu(c1, c1))
        self.stage2 = nn.Sequential(*conv_bn_relu(c1, c2), *conv_bn_relu(c2, c2), *conv_bn_relu(c2, c2))
        self.stage3 = nn.Sequential(*conv_bn_relu(c2, c3), *conv_bn_relu(c3, c3), *conv_bn_relu(c3, c3))
        self.fc = nn.Linear(c3 * 3 * 3, hidden)
        self.classifier = nn.Linear(hidden, len(CLASSES))

    def hidden_layers(self) -> dict[str, nn.Module]:
        """The regularised hidden layers by name: the nine convolutions and `fc`."""
        return {name: m for name, m in self.named_modules() if isinstance(m, nn.Conv2d)} | {"fc": self.fc}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in (self.stage1, self.stage2, self.stage3):
            x = torch.max_pool2d(stage(x), 2)
        return self.classifier(torch.relu(self.fc(x.flatten(1))))

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        images, labels = batch
        x = normalize(images)
        if self.augment_data:
            x = augment(x, self.generator)
        return nn.functional.cross_entropy(self(x), labels)

    def configure_optimizers(self):  # type: ignore[override]
        optimizer = torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.max_steps_hint))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
        """Top-1 accuracy on uint8 images (eval mode, no augmentation)."""
        was_training = self.training
        self.eval()
        correct = 0
        for start in range(0, len(labels), batch_size):
            x = normalize(images[start : start + batch_size].to(self.device))
            correct += int((self(x).argmax(1) == labels[start : start + batch_size].to(self.device)).sum())
        self.train(was_training)
        return correct / max(1, len(labels))


def stratified_split(labels: torch.Tensor, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(chosen, rest)`: indices of `per_class` images of every class drawn with `seed`, and the others."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(len(CLASSES)):
        members = (labels == c).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    picked = torch.cat(chosen).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[picked] = False
    return picked, mask.nonzero().flatten()
