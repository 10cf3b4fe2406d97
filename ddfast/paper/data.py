"""Datasets of the paper: MNIST / Fashion-MNIST (IDX), CIFAR-10, and the paper's preprocessing.

Readers return raw pixels: ``uint8`` images and ``int64`` labels as torch tensors.

* MNIST / Fashion-MNIST: images ``[N, 28, 28]``.
* CIFAR-10: images ``[N, 3, 32, 32]`` (channel first).

Preprocessing (the paper's): the per-pixel mean image of the training set is subtracted.
``preprocess(images, mean, scale)`` returns ``(images - mean) * scale`` as float32 with a
channel dimension. ``scale = 1/255`` (default, :data:`UNIT`) gives the [0,1]-scaled,
mean-subtracted space that DESIGN.md recommends for training PyTorch-initialised models;
``scale = 1.0`` (:data:`PIXEL`) is the paper's 0..255 space. rho_2 is a ratio and does not
depend on the scale; rho'_2 (unnormalised ``||D||_2``) is always reported in 0..255 pixel
units, i.e. ``||D|| / scale``.

Nothing here unpickles untrusted data: the CIFAR-10 binary version is parsed as raw bytes,
and the python version goes through :class:`RestrictedUnpickler`, which only rebuilds numpy
arrays, lists, dicts, strings and numbers.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "ChecksumError",
    "UNIT",
    "PIXEL",
    "IDX_FILES",
    "read_idx",
    "mnist_root_candidates",
    "find_mnist_root",
    "verify_checksums",
    "load_idx_dataset",
    "load_mnist",
    "load_fashion_mnist",
    "load_cifar10",
    "download_cifar10",
    "RestrictedUnpickler",
    "restricted_load",
    "mean_image",
    "preprocess",
    "deprocess",
    "Prepared",
    "prepare",
]

PathLike = Union[str, os.PathLike]

#: scale of the [0,1] mean-subtracted space (the default for training here)
UNIT = 1.0 / 255.0
#: scale of the paper's 0..255 mean-subtracted space
PIXEL = 1.0

_IDX_DTYPES: Dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: split -> (images, labels) file names of MNIST / Fashion-MNIST, without ``.gz``
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class ChecksumError(ValueError):
    """A data file does not match its SHA-256 in ``SHA256SUMS`` (the message names it)."""


# ----------------------------------------------------------------------------- IDX


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file name says
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt gzip data ({exc})") from exc
    return raw


def read_idx(path: PathLike) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw) into a numpy array of its stored shape.

    The IDX header is ``0x00 0x00 <dtype code> <ndim>`` then ``ndim`` big-endian int32 sizes.
    Returns a native-endian array (uint8 for MNIST). Raises ``ValueError`` naming the file if
    the header or the size is wrong.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4]!r})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX size mismatch: header says shape {shape} ({expected} bytes), "
            f"file has {len(raw)} bytes"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find_file(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{root}: neither {stem}.gz nor {stem} found")


def mnist_root_candidates() -> List[Path]:
    """The directories :func:`find_mnist_root` tries, in order."""
    roots = []
    env = os.environ.get("DDFAST_DATA")
    if env:
        roots += [Path(env) / "mnist", Path(env)]
    roots.append(Path.cwd() / "data" / "mnist")
    # source checkout (editable install or PYTHONPATH): <repo>/ddfast/paper/data.py -> <repo>/data
    roots.append(Path(__file__).resolve().parents[2] / "data" / "mnist")
    return roots


def find_mnist_root() -> Path:
    """The directory of the shipped MNIST files.

    Looked up in order: ``$DDFAST_DATA/mnist``, ``$DDFAST_DATA``, ``./data/mnist`` (current
    working directory), ``<source checkout>/data/mnist``. Raises ``FileNotFoundError`` naming
    every place tried.
    """
    tried = mnist_root_candidates()
    for root in tried:
        if any((root / (IDX_FILES["train"][0] + ext)).is_file() for ext in (".gz", "")):
            return root
    raise FileNotFoundError(
        "MNIST not found; looked in: " + ", ".join(str(r) for r in tried)
        + ". Pass root=... (CLI: --data DIR) or set DDFAST_DATA to the directory holding the IDX files."
    )


def _parse_sums(root: Path) -> Dict[str, str]:
    sums = {}
    with open(root / "SHA256SUMS", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or len(parts[0]) != 64:
                raise ValueError(f"{root / 'SHA256SUMS'}:{n}: expected '<sha256> <file>', got {line!r}")
            sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def verify_checksums(root: PathLike, files: Optional[Iterable[str]] = None) -> List[str]:
    """Check files of ``root`` against ``root/SHA256SUMS`` (``#`` lines are comments).

    ``files``: names to check (default: every file listed). Returns the names checked.
    Raises :class:`ChecksumError` naming the first bad file, ``FileNotFoundError`` if
    SHA256SUMS or a listed file is missing.
    """
    root = Path(root)
    sums = _parse_sums(root)
    names = list(sums) if files is None else list(files)
    for name in names:
        if name not in sums:
            raise ChecksumError(f"{root / name}: not listed in {root / 'SHA256SUMS'}")
        h = hashlib.sha256()
        with open(root / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != sums[name]:
            raise ChecksumError(
                f"{root / name}: SHA-256 {h.hexdigest()} does not match {sums[name]} "
                f"from {root / 'SHA256SUMS'}; the file is corrupt or was replaced"
            )
    return names


def load_idx_dataset(root: PathLike, split: str = "train", verify: bool = False) -> Tuple[Tensor, Tensor]:
    """Images ``uint8 [N, H, W]`` and labels ``int64 [N]`` of an MNIST-layout directory.

    ``split``: ``"train"`` or ``"test"``. Files may be gzip-compressed (``.gz``) or raw.
    ``verify``: check the two files against ``root/SHA256SUMS`` first.
    """
    if split not in IDX_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist")
    img_path, lab_path = (_find_file(root, stem) for stem in IDX_FILES[split])
    if verify:
        verify_checksums(root, [img_path.name, lab_path.name])
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{root}: images {images.shape} and labels {labels.shape} do not form a dataset"
        )
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise ValueError(f"{lab_path}: labels outside 0..9 (min {int(labels.min())}, max {int(labels.max())})")
    return torch.from_numpy(images.astype(np.uint8, copy=False)), torch.from_numpy(labels.astype(np.int64))


def load_mnist(root: Optional[PathLike] = None, split: str = "train", verify: bool = True) -> Tuple[Tensor, Tensor]:
    """MNIST ``split`` as ``(images uint8 [N, 28, 28], labels int64 [N])``.

    ``root`` defaults to :func:`find_mnist_root` (the shipped copy). With ``verify`` the files
    are checked against ``SHA256SUMS`` when the directory has one (the shipped copy does).
    """
    root = find_mnist_root() if root is None else Path(root)
    has_sums = (root / "SHA256SUMS").is_file()
    return load_idx_dataset(root, split, verify=verify and has_sums)


def load_fashion_mnist(root: PathLike, split: str = "train", verify: bool = True) -> Tuple[Tensor, Tensor]:
    """Fashion-MNIST from a user directory (same IDX file names as MNIST; not shipped)."""
    root = Path(root)
    return load_idx_dataset(root, split, verify=verify and (root / "SHA256SUMS").is_file())


# ----------------------------------------------------------------------------- CIFAR-10

_CIFAR_BIN = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
_CIFAR_PY = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}

#: globals a CIFAR-10 python pickle may reference: numpy array reconstruction and the codec
#: helper pickle protocol 2 uses for bytes. Everything else is refused.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds only numpy arrays and plain containers.

    Any global other than numpy's array reconstruction helpers (``_reconstruct``,
    ``ndarray``, ``dtype``) and ``_codecs.encode`` raises ``pickle.UnpicklingError``, so a
    crafted file cannot run code.
    """

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")


def restricted_load(fh: BinaryIO) -> object:
    """Unpickle ``fh`` (binary file object) with :class:`RestrictedUnpickler` (py2 pickles ok)."""
    return RestrictedUnpickler(fh, encoding="bytes").load()


def _cifar_bin(paths: Sequence[Path]) -> Tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for p in paths:
        raw = np.fromfile(p, dtype=np.uint8)
        if raw.size % 3073:
            raise ValueError(f"{p}: size {raw.size} is not a multiple of 3073 (CIFAR-10 binary record)")
        rec = raw.reshape(-1, 3073)
        labels.append(rec[:, 0].astype(np.int64))
        images.append(rec[:, 1:].reshape(-1, 3, 32, 32))
    return np.concatenate(images), np.concatenate(labels)


def _cifar_py(paths: Sequence[Path]) -> Tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for p in paths:
        with open(p, "rb") as fh:
            try:
                d = restricted_load(fh)
            except pickle.UnpicklingError as exc:
                raise ValueError(f"{p}: {exc}") from exc
        if not isinstance(d, dict):
            raise ValueError(f"{p}: expected a dict, got {type(d).__name__}")
        d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
        if "data" not in d or "labels" not in d:
            raise ValueError(f"{p}: missing 'data' or 'labels'")
        data = np.asarray(d["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{p}: data has shape {data.shape}, expected [N, 3072]")
        lab = np.asarray(d["labels"], dtype=np.int64)
        if lab.shape != (data.shape[0],):
            raise ValueError(f"{p}: {lab.shape[0]} labels for {data.shape[0]} images")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def load_cifar10(root: PathLike, split: str = "train") -> Tuple[Tensor, Tensor]:
    """CIFAR-10 ``split`` from a user directory: ``(images uint8 [N, 3, 32, 32], labels int64 [N])``.

    Accepts the binary version (``data_batch_1.bin`` ... ``test_batch.bin``, also inside a
    ``cifar-10-batches-bin`` subdirectory) or the python version (``data_batch_1`` ... inside
    ``cifar-10-batches-py``), the latter read with :class:`RestrictedUnpickler`.
    """
    if split not in _CIFAR_BIN:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    for d in (root, root / "cifar-10-batches-bin"):
        paths = [d / n for n in _CIFAR_BIN[split]]
        if all(p.is_file() for p in paths):
            images, labels = _cifar_bin(paths)
            break
    else:
        for d in (root, root / "cifar-10-batches-py"):
            paths = [d / n for n in _CIFAR_PY[split]]
            if all(p.is_file() for p in paths):
                images, labels = _cifar_py(paths)
                break
        else:
            raise FileNotFoundError(
                f"CIFAR-10 {split} files not found under {root} (expected {_CIFAR_BIN[split][0]}... "
                f"or cifar-10-batches-py/{_CIFAR_PY[split][0]}...); see ddfast.paper.data.download_cifar10"
            )
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{root}: CIFAR-10 labels outside 0..9")
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


def download_cifar10(root: PathLike) -> Path:
    """Download CIFAR-10 (python version) into ``root`` with torchvision, if it is installed.

    Returns ``root``; afterwards :func:`load_cifar10` reads it. Raises ``RuntimeError`` when
    torchvision is missing (this package does not download anything by itself).
    """
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as exc:
        raise RuntimeError(
            "download_cifar10 needs torchvision (pip install torchvision) and internet access; "
            "otherwise download cifar-10-binary.tar.gz yourself and pass its directory"
        ) from exc
    CIFAR10(str(root), train=True, download=True)
    return Path(root)


# ----------------------------------------------------------------------------- preprocessing


def mean_image(train_images: Tensor) -> Tensor:
    """Per-pixel mean of ``train_images`` (uint8 ``[N, ...]``) as float32 ``[...]``, 0..255 units."""
    if not isinstance(train_images, Tensor) or train_images.ndim < 2:
        raise TypeError("train_images must be a tensor [N, ...]")
    return train_images.to(torch.float64).mean(0).to(torch.float32)


def _with_channel(x: Tensor) -> Tensor:
    return x.unsqueeze(1) if x.ndim == 3 else x  # MNIST [N,28,28] -> [N,1,28,28]


def preprocess(images: Tensor, mean: Tensor, scale: float = UNIT) -> Tensor:
    """The paper's preprocessing: ``(images - mean) * scale`` as float32.

    ``images``: uint8 ``[N, H, W]`` (gets a channel dim -> ``[N, 1, H, W]``) or ``[N, C, H, W]``.
    ``mean``: from :func:`mean_image` (0..255 units). ``scale``: :data:`UNIT` (1/255, [0,1]
    space, default) or :data:`PIXEL` (1, the paper's 0..255 space).
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    x = _with_channel(images).to(torch.float32)
    m = _with_channel(mean.unsqueeze(0)).to(torch.float32) if mean.ndim == images.ndim - 1 else mean
    if x.shape[1:] != m.shape[1:]:
        raise ValueError(f"mean of shape {tuple(mean.shape)} does not fit images {tuple(images.shape)}")
    return (x - m) * scale


def deprocess(x: Tensor, mean: Tensor, scale: float = UNIT) -> Tensor:
    """Inverse of :func:`preprocess` for pictures: uint8 ``[N, C, H, W]``, rounded and clipped to 0..255."""
    m = mean.to(torch.float32)
    m = m.unsqueeze(0) if m.ndim == 2 else m  # [H,W] -> [1,H,W] (channel)
    return (x.detach().to(torch.float32) / scale + m).round().clamp(0, 255).to(torch.uint8)


@dataclass
class Prepared:
    """Preprocessed train/test tensors of one dataset.

    ``x_*``: float32 ``[N, C, H, W]`` in the preprocessed space; ``y_*``: int64 ``[N]``;
    ``mean``: float32 mean image (0..255 units); ``scale``: as in :func:`preprocess`.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    mean: Tensor
    scale: float

    @property
    def bounds(self) -> Tuple[Tensor, Tensor]:
        """Per-pixel bounds of valid images (pixels 0..255) in the preprocessed space, ``[1, C, H, W]``."""
        m = self.mean.to(self.x_train.dtype)
        m = m.unsqueeze(0).unsqueeze(0) if m.ndim == 2 else m.unsqueeze(0)
        return (0 - m) * self.scale, (255 - m) * self.scale

    def _mean01(self) -> Tensor:
        m = self.mean.to(torch.float32) / 255.0
        return m.unsqueeze(0).unsqueeze(0) if m.ndim == 2 else m.unsqueeze(0)

    def pixels(self, x: Tensor) -> Tensor:
        """Preprocessed ``x [N, C, H, W]`` back to images in [0, 1] (``pixels / 255``; clamped: rounding)."""
        return (x.to(torch.float32) / (255.0 * self.scale) + self._mean01().to(x.device)).clamp(0, 1)

    def pixel_model(self, net: nn.Module) -> nn.Module:
        """``net`` taking images in [0, 1] (what :func:`pixels` returns): a
        :class:`ddfast.robustness.PixelInput` that applies this preprocessing first."""
        from ..robustness import PixelInput

        dev = next(net.parameters()).device
        return PixelInput(net, self._mean01(), 1.0 / (255.0 * self.scale)).to(dev)


def prepare(dataset: str = "mnist", root: Optional[PathLike] = None, scale: float = UNIT,
            verify: bool = True) -> Prepared:
    """Load and preprocess ``dataset`` (``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``)."""
    if dataset == "mnist":
        (tr, ytr), (te, yte) = load_mnist(root, "train", verify), load_mnist(root, "test", verify)
    elif dataset == "fashion-mnist":
        if root is None:
            raise ValueError("fashion-mnist is not shipped: pass root (CLI: --data DIR)")
        (tr, ytr), (te, yte) = load_fashion_mnist(root, "train", verify), load_fashion_mnist(root, "test", verify)
    elif dataset == "cifar10":
        if root is None:
            raise ValueError("cifar10 is not shipped: pass root (CLI: --data DIR)")
        (tr, ytr), (te, yte) = load_cifar10(root, "train"), load_cifar10(root, "test")
    else:
        raise ValueError(f"dataset must be 'mnist', 'fashion-mnist' or 'cifar10', got {dataset!r}")
    mean = mean_image(tr)
    return Prepared(preprocess(tr, mean, scale), ytr, preprocess(te, mean, scale), yte, mean, scale)
