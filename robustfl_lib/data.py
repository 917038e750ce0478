"""Datasets and client partitions.

* :func:`load_dataset` gives train/test tensors shaped ``(N, C, H, W)``, float32 in
  ``[0, 1]``, labels int64. ``"digits"`` (scikit-learn's bundled 8x8 handwritten
  digits) works offline and is the default of every chapter; ``"mnist"`` and
  ``"fashion_mnist"`` are read from gzipped IDX files, downloaded and
  hash-checked only when ``download=True``; ``"cifar10"`` is read from the python-pickle
  release ``cifar-10-python.tar.gz`` under the same rules (:mod:`robustfl_lib.data_cifar`).
* :func:`partition` splits a label vector among clients: IID, Dirichlet label
  skew (Hsu et al. 2019) or label shards (McMahan et al. 2017).

Taught in chapter ``00_introduction``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Dataset",
    "IDXError",
    "CIFARError",
    "DATASETS",
    "load_dataset",
    "read_idx",
    "download_file",
    "partition",
    "partition_like",
    "label_counts",
    "label_skew",
]


class IDXError(ValueError):
    """An IDX file is truncated, corrupt, or not an IDX file at all."""


class CIFARError(ValueError):
    """The CIFAR-10 archive or one of its pickled batches is truncated, corrupt, or not in the
    format of the python release (:mod:`robustfl_lib.data_cifar`)."""


@dataclass(frozen=True)
class Dataset:
    """A train/test split. Inputs are float32 in [0, 1] shaped (N, C, H, W); labels int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, (C, H, W)."""
        return tuple(self.x_train.shape[1:])

    def to(self, device: str | torch.device) -> Dataset:
        """A copy with every tensor on ``device``."""
        return Dataset(
            self.name,
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_test.to(device),
            self.y_test.to(device),
            self.num_classes,
            self.class_names,
        )

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={tuple(self.x_train.shape)}, "
            f"test={tuple(self.x_test.shape)}, num_classes={self.num_classes})"
        )


# Canonical sources and the md5 sums they publish (the ones torchvision checks).
_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
DATASETS: dict[str, dict] = {
    "digits": {"offline": True},
    "mnist": {
        "md5": _MNIST_MD5,
        "mirrors": (
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        "classes": tuple(str(i) for i in range(10)),
    },
    "fashion_mnist": {
        "md5": _FASHION_MD5,
        "mirrors": (
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        "classes": (
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
    },
    # The python-pickle release of CIFAR-10 (Krizhevsky 2009) and its published md5 (the one torchvision checks).
    "cifar10": {
        "md5": "c58f30108f718f92721af3b95e74349a",
        "mirrors": ("https://www.cs.toronto.edu/~kriz/",),
        "classes": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    },
}

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def default_root() -> Path:
    """Where datasets are cached: ``$ROBUSTFL_DATA`` or ``~/.cache/robustfl``."""
    return Path(os.environ.get("ROBUSTFL_DATA", Path.home() / ".cache" / "robustfl"))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzipped or not) into an array.

    The header is two zero bytes, a type code, the number of dimensions and
    one big-endian uint32 per dimension; the payload must hold exactly the
    product of the dimensions. Anything else raises :class:`IDXError` naming
    the file, so a truncated download never turns into a wrong array.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"IDX file not found: {path}")
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise IDXError(f"{path}: corrupt or truncated gzip stream ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IDXError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise IDXError(f"{path}: unknown IDX data type code 0x{code:02x}")
    if ndim == 0:
        raise IDXError(f"{path}: IDX header declares zero dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        kind = "truncated" if actual < expected else "has trailing bytes"
        raise IDXError(
            f"{path}: IDX payload {kind}: header {dims} needs {expected} bytes, found {actual}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(urls: Sequence[str], dest: str | os.PathLike, md5: str, timeout: float = 60.0) -> Path:
    """Download ``dest`` from the first of ``urls`` whose bytes match ``md5``.

    The bytes go to a temporary file in the destination folder, are checked,
    then renamed into place, so a failed or interrupted download never leaves
    a half-written ``dest`` behind. Raises ``RuntimeError`` listing every
    mirror's failure when none works.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
            got = _md5(tmp)
            if got != md5:
                errors.append(f"{url}: md5 {got} != expected {md5}")
                continue
            os.replace(tmp, dest)
            return dest
        except Exception as err:  # a mirror may fail in many ways; try the next one
            errors.append(f"{url}: {err}")
        finally:
            tmp.unlink(missing_ok=True)
    raise RuntimeError(f"could not download {dest.name}:\n  " + "\n  ".join(errors))


def _idx_pair(root: Path, prefix: str, spec: dict, name: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for kind in ("images-idx3", "labels-idx1"):
        fname = f"{prefix}-{kind}-ubyte.gz"
        path = root / fname
        if download and (not path.exists() or _md5(path) != spec["md5"][fname]):
            download_file([m + fname for m in spec["mirrors"]], path, spec["md5"][fname])
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: call load_dataset({name!r}, root={str(root)!r}, download=True) "
                f"to fetch it (needs internet), or copy {fname} there"
            )
        arrays.append(read_idx(path))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise IDXError(
            f"{root}/{prefix}-*: images {images.shape} and labels {labels.shape} do not match"
        )
    if labels.size and labels.max() >= len(spec["classes"]):
        raise IDXError(f"{root}/{prefix}-labels-idx1-ubyte.gz: label {labels.max()} out of range")
    return images, labels


def _to_tensors(images: np.ndarray, labels: np.ndarray, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32) / scale)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(test)


def load_dataset(
    name: str = "digits",
    root: str | os.PathLike | None = None,
    download: bool = False,
    seed: int = 0,
    test_fraction: float = 0.2,
    files: str = "all",
) -> Dataset:
    """Load a dataset as tensors.

    Parameters
    ----------
    name:
        ``"digits"`` (1,797 8x8 images bundled with scikit-learn, offline),
        ``"mnist"`` or ``"fashion_mnist"`` (28x28, IDX files under ``root``),
        ``"cifar10"`` (3x32x32, ``cifar-10-python.tar.gz`` under ``root``:
        :func:`robustfl_lib.data_cifar.load_cifar10`).
    root:
        Folder of the IDX files (or of the CIFAR-10 archive); default
        ``$ROBUSTFL_DATA/<name>`` or ``~/.cache/robustfl/<name>``.
    download:
        Fetch missing files from the canonical mirrors and check their md5.
    seed, test_fraction:
        The stratified train/test split of ``digits`` (and of ``files="t10k"``).
    files:
        ``"all"`` uses the official train and test files; ``"t10k"`` uses only
        the 10,000 official test images, split stratified by ``test_fraction``
        (``test_fraction=0.2`` gives the 8,000/2,000 split of the benchmarks);
        for CIFAR-10, its test batch.
    """
    key = name.lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if key == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = bunch.images.astype(np.float32)  # values 0..16
        labels = bunch.target.astype(np.int64)
        tr, te = _stratified_split(labels, test_fraction, seed)
        x_tr, y_tr = _to_tensors(images[tr], labels[tr], 16.0)
        x_te, y_te = _to_tensors(images[te], labels[te], 16.0)
        return Dataset("digits", x_tr, y_tr, x_te, y_te, 10, tuple(str(i) for i in range(10)))

    spec = DATASETS[key]
    root = Path(root) if root is not None else default_root() / key
    if key == "cifar10":
        from .data_cifar import load_cifar10  # imports this module: loaded on first use

        return load_cifar10(root, download=download, files=files, seed=seed, test_fraction=test_fraction)
    if files == "all":
        x_tr, y_tr = _to_tensors(*_idx_pair(root, "train", spec, key, download), 255.0)
        x_te, y_te = _to_tensors(*_idx_pair(root, "t10k", spec, key, download), 255.0)
    elif files == "t10k":
        images, labels = _idx_pair(root, "t10k", spec, key, download)
        tr, te = _stratified_split(labels, test_fraction, seed)
        x_tr, y_tr = _to_tensors(images[tr], labels[tr], 255.0)
        x_te, y_te = _to_tensors(images[te], labels[te], 255.0)
    else:
        raise ValueError(f"files must be 'all' or 't10k', got {files!r}")
    return Dataset(key, x_tr, y_tr, x_te, y_te, len(spec["classes"]), spec["classes"])


def _as_numpy_labels(labels) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0):
        raise ValueError("labels must be non-negative integers")
    return arr.astype(np.int64)


def partition(
    labels,
    num_clients: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    shards_per_client: int = 2,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[torch.Tensor]:
    """Split sample indices among ``num_clients`` clients.

    Every index appears in exactly one client, each client gets at least
    ``min_size`` samples, and the result depends only on the arguments.

    * ``"iid"``: a random permutation cut into near-equal parts.
    * ``"dirichlet"``: for each class ``k``, proportions ``p_k ~ Dir(alpha 1)``
      over clients decide how that class's samples are shared (Hsu, Qi & Brown
      2019). Small ``alpha`` (0.1) gives clients few classes each; large alpha
      tends to IID. Draws are repeated (up to ``max_tries``) until every client
      has ``min_size`` samples, else a ``ValueError``.
    * ``"shards"``: samples sorted by label, cut into
      ``num_clients * shards_per_client`` shards, each client receiving
      ``shards_per_client`` of them (McMahan et al. 2017).

    Returns one sorted int64 index tensor per client.
    """
    y = _as_numpy_labels(labels)
    n = len(y)
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if num_clients * min_size > n:
        raise ValueError(
            f"cannot give {num_clients} clients at least {min_size} sample(s) each from {n} samples"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
        classes = np.unique(y)
        for _ in range(max_tries):
            buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
            for k in classes:
                idx_k = rng.permutation(np.flatnonzero(y == k))
                p = rng.dirichlet(np.full(num_clients, alpha))
                cuts = (np.cumsum(p)[:-1] * len(idx_k)).astype(int)
                for client, chunk in enumerate(np.split(idx_k, cuts)):
                    buckets[client].append(chunk)
            parts = [np.concatenate(b) for b in buckets]
            if min(len(p) for p in parts) >= min_size:
                break
        else:
            raise ValueError(
                f"Dirichlet(alpha={alpha}) left a client with fewer than {min_size} sample(s) in "
                f"{max_tries} draws; raise alpha or lower num_clients"
            )
    elif scheme == "shards":
        num_shards = num_clients * shards_per_client
        if shards_per_client < 1 or num_shards > n:
            raise ValueError(f"cannot cut {n} samples into {num_shards} shards")
        order = np.argsort(y, kind="stable")
        shards = np.array_split(order, num_shards)
        assignment = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
        parts = [np.concatenate([shards[s] for s in row]) for row in assignment]
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose 'iid', 'dirichlet' or 'shards'")
    return [torch.from_numpy(np.sort(p).astype(np.int64)) for p in parts]


def partition_like(labels, reference_labels, reference_parts: Sequence[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    r"""Split ``labels`` (e.g. the test split) among the clients of ``reference_parts`` so
    that each client gets the label mix of its own reference (training) data.

    Class :math:`k`'s samples are shuffled and cut among the clients in
    proportion to :math:`c_{ik}`, client :math:`i`'s number of class-:math:`k`
    reference samples. Client :math:`i` then holds about :math:`t_k c_{ik} / C_k`
    samples of class :math:`k` (:math:`t_k`, :math:`C_k`: the class's sizes in
    ``labels`` and in the reference), which is proportional to :math:`c_{ik}`
    whenever the two splits have the same class balance (a stratified
    train/test split). Every index appears in exactly one client; a class
    absent from the reference is shared evenly. The per-client test sets of
    chapter ``13_exercise_robust_personalization``: a personalized model is
    judged on the distribution its client will meet.
    """
    y = _as_numpy_labels(labels)
    ref = _as_numpy_labels(reference_labels)
    if len(reference_parts) < 1:
        raise ValueError("reference_parts must hold at least one client")
    k = int(max(y.max(initial=-1), ref.max(initial=-1)) + 1)
    counts = label_counts(ref, reference_parts, num_classes=k).astype(np.float64)  # (clients, classes)
    num_clients = counts.shape[0]
    rng = np.random.default_rng(seed)
    buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(k):
        idx = rng.permutation(np.flatnonzero(y == c))
        share = counts[:, c] if counts[:, c].sum() > 0 else np.ones(num_clients)
        cuts = np.round(np.cumsum(share)[:-1] / share.sum() * len(idx)).astype(int)
        for client, chunk in enumerate(np.split(idx, cuts)):
            buckets[client].append(chunk)
    return [torch.from_numpy(np.sort(np.concatenate(b)).astype(np.int64)) for b in buckets]


def label_counts(labels, parts: Sequence[torch.Tensor], num_classes: int | None = None) -> np.ndarray:
    """Matrix of shape (num_clients, num_classes): how many samples of each class each client holds."""
    y = _as_numpy_labels(labels)
    k = int(num_classes if num_classes is not None else y.max() + 1)
    return np.stack([np.bincount(y[np.asarray(p)], minlength=k) for p in parts])


def label_skew(labels, parts: Sequence[torch.Tensor]) -> float:
    """Mean total-variation distance between each client's label mix and the global one.

    0 for perfectly IID clients, close to 1 when each client holds a single
    class of many; used to show that Dirichlet skew grows as alpha shrinks.
    """
    counts = label_counts(labels, parts).astype(np.float64)
    local = counts / counts.sum(axis=1, keepdims=True)
    glob = counts.sum(axis=0) / counts.sum()
    return float(0.5 * np.abs(local - glob).sum(axis=1).mean())
