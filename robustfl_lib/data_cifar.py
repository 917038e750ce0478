"""CIFAR-10 from its python-pickle release (Krizhevsky 2009, "Learning Multiple Layers of
Features from Tiny Images"), read by :func:`robustfl_lib.data.load_dataset` as ``"cifar10"``.

The release is one archive, ``cifar-10-python.tar.gz`` (md5
``c58f30108f718f92721af3b95e74349a``), holding the folder ``cifar-10-batches-py/`` with
``data_batch_1`` .. ``data_batch_5`` (10,000 training images each), ``test_batch`` (10,000) and
``batches.meta``. Each batch is a pickled dict (written by Python 2's cPickle) whose
``b"data"`` is a uint8 array of shape (N, 3072), one row per image: 1,024 red, then 1,024
green, then 1,024 blue values, each plane row-major, so a row reshapes to (3, 32, 32); and whose
``b"labels"`` is a list of N integers in 0..9. ``batches.meta`` holds ``b"label_names"``.

Reading follows the MNIST loader's rules: the archive is downloaded only with
``download=True``, from a mirror, to a temporary file that is md5-checked and then renamed
into place (:func:`robustfl_lib.data.download_file`); a missing file raises
``FileNotFoundError`` saying how to get it; a truncated or corrupt archive, a missing member,
a pickle that is not a CIFAR-10 batch, or one that asks for any class outside the format,
raises :class:`~robustfl_lib.data.CIFARError` naming the file. The archive is read in memory,
never extracted to disk (so a crafted member name cannot write outside ``root``). A folder
``cifar-10-batches-py/`` already extracted under ``root`` (torchvision's layout) is read when
the archive is absent.

No chapter uses CIFAR-10 yet (the chapters run on 8x8 digits); ``tests/test_cifar10.py`` checks
the reader on files it writes in the release's format.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .data import CIFARError, DATASETS, Dataset, _md5, _stratified_split, _to_tensors, download_file

__all__ = ["ARCHIVE", "FOLDER", "TRAIN_BATCHES", "TEST_BATCH", "META", "read_cifar_batch", "load_cifar10"]

ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"

try:  # numpy >= 2 keeps the function in numpy._core; the files name numpy.core, its old home
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct


class _CIFARUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a CIFAR-10 batch refers to.

    ``pickle.load`` on an untrusted file can call any importable function (``os.system``
    included) while loading, since a pickle names the callables that rebuild its objects.
    A CIFAR-10 batch needs none but numpy's array reconstruction: a dict, bytes, ints and lists
    are built by opcodes, and the uint8 array by ``numpy.core.multiarray._reconstruct``,
    ``numpy.ndarray`` and ``numpy.dtype``. Every other global is refused before it is
    imported, so a tampered file can fail to load but cannot run code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,  # the name the official files use
        ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,  # the same, as numpy >= 2 writes it
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        obj = self._ALLOWED.get((module, name))
        if obj is None:
            raise _ForbiddenGlobal(f"{module}.{name}")
        return obj


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


def _unpickle(raw: bytes, where: str) -> Any:
    try:
        # encoding="bytes": the files were written by Python 2, whose str keys become bytes.
        return _CIFARUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _ForbiddenGlobal as err:
        raise CIFARError(f"{where}: the pickle asks for {err}, which is not allowed (a CIFAR-10 batch needs only "
                         f"dicts, lists, bytes, ints and a numpy uint8 array); refusing to load it") from None
    except Exception as err:  # truncated or damaged pickles fail in many ways (EOFError, ValueError, ...)
        raise CIFARError(f"{where}: not a readable pickle, truncated or corrupt ({type(err).__name__}: {err})") from err


def read_cifar_batch(raw: bytes, where: str = "batch", num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR-10 batch (its bytes) as ``(images, labels)``: uint8 ``(N, 3, 32, 32)``
    (channel planes red, green, blue) and int64 ``(N,)`` in ``[0, num_classes)``.

    Raises :class:`~robustfl_lib.data.CIFARError` naming ``where`` for anything else: a pickle
    that is truncated, corrupt or refers to a class outside the format, a dict without
    ``b"data"`` / ``b"labels"``, data that is not uint8 of shape (N, 3072), labels that do not
    match it in number or lie outside the classes."""
    obj = _unpickle(raw, where)
    if not isinstance(obj, dict) or b"data" not in obj or b"labels" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise CIFARError(f"{where}: not a CIFAR-10 batch (need a dict with b'data' and b'labels', got {keys})")
    data, labels = obj[b"data"], obj[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise CIFARError(f"{where}: b'data' must be a uint8 array of shape (N, 3072), got {desc}")
    if not isinstance(labels, (list, np.ndarray)) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        raise CIFARError(f"{where}: b'labels' must be a list of integers")
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(y) != len(data):
        raise CIFARError(f"{where}: {len(data)} images but {len(y)} labels")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise CIFARError(f"{where}: label {int(y.min() if y.min() < 0 else y.max())} outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), y


def _read_meta(raw: bytes, where: str, num_classes: int) -> tuple[str, ...]:
    obj = _unpickle(raw, where)
    names = obj.get(b"label_names") if isinstance(obj, dict) else None
    if not isinstance(names, list) or len(names) != num_classes or not all(isinstance(n, bytes) for n in names):
        raise CIFARError(f"{where}: b'label_names' must list {num_classes} class names")
    return tuple(n.decode("ascii", errors="replace") for n in names)


def _missing(root: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{root / ARCHIVE} is missing: call load_dataset('cifar10', root={str(root)!r}, download=True) to fetch it "
        f"(needs internet, 163 MB), or copy {ARCHIVE} (or its extracted folder {FOLDER}/) there")


def _read_members(root: Path, names: tuple[str, ...]) -> tuple[dict[str, bytes], str]:
    """The raw bytes of ``names`` from the archive (or the extracted folder), and where they came from."""
    archive, folder = root / ARCHIVE, root / FOLDER
    if archive.exists():
        try:
            # Decompressing the whole stream checks gzip's CRC and length, which catches a damaged
            # archive even where the damage still inflates to bytes.
            raw = gzip.decompress(archive.read_bytes())
        except (OSError, EOFError, zlib.error) as err:
            raise CIFARError(f"{archive}: corrupt or truncated gzip stream ({err})") from err
        out = {}
        try:
            with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
                for name in names:
                    member = f"{FOLDER}/{name}"
                    try:
                        info = tar.getmember(member)
                    except KeyError:
                        raise CIFARError(f"{archive} has no member {member}: not the CIFAR-10 python release") from None
                    handle = tar.extractfile(info) if info.isfile() else None
                    if handle is None:
                        raise CIFARError(f"{archive}: member {member} is not a regular file")
                    out[name] = handle.read()
        except tarfile.TarError as err:
            raise CIFARError(f"{archive}: not a readable tar archive, truncated or corrupt ({err})") from err
        return out, str(archive)
    if folder.is_dir():
        out = {}
        for name in names:
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing from the extracted CIFAR-10 folder {folder}")
            out[name] = path.read_bytes()
        return out, str(folder)
    raise _missing(root)


def load_cifar10(root: str | os.PathLike, download: bool = False, files: str = "all", seed: int = 0,
                 test_fraction: float = 0.2) -> Dataset:
    """CIFAR-10 as a :class:`~robustfl_lib.data.Dataset`: inputs float32 in [0, 1] shaped
    (N, 3, 32, 32), labels int64, the class names of ``batches.meta``.

    ``files="all"``: the five training batches (50,000) and the test batch (10,000);
    ``files="t10k"``: the test batch only, split stratified by ``test_fraction`` with ``seed``
    (as MNIST's ``"t10k"``: a CPU-sized 8,000/2,000 split). ``download=True`` fetches the
    archive when it is missing or its md5 differs from the official one. Use
    :func:`robustfl_lib.data.load_dataset` (``"cifar10"``) rather than this function."""
    spec = DATASETS["cifar10"]
    root = Path(root)
    if files not in ("all", "t10k"):
        raise ValueError(f"files must be 'all' or 't10k', got {files!r}")
    archive = root / ARCHIVE
    if download and (not archive.exists() or _md5(archive) != spec["md5"]):
        download_file([m + ARCHIVE for m in spec["mirrors"]], archive, spec["md5"])
    k = len(spec["classes"])
    train_names = TRAIN_BATCHES if files == "all" else ()
    members, source = _read_members(root, (META, *train_names, TEST_BATCH))
    classes = _read_meta(members[META], f"{source}: {META}", k)
    batches = {n: read_cifar_batch(members.pop(n), f"{source}: {n}", k) for n in (*train_names, TEST_BATCH)}
    x_te, y_te = batches[TEST_BATCH]
    if files == "all":
        x_tr = np.concatenate([batches[n][0] for n in train_names])
        y_tr = np.concatenate([batches[n][1] for n in train_names])
    else:
        tr, te = _stratified_split(y_te, test_fraction, seed)
        x_tr, y_tr, x_te, y_te = x_te[tr], y_te[tr], x_te[te], y_te[te]
    x_train, y_train = _to_tensors(x_tr, y_tr, 255.0)
    x_test, y_test = _to_tensors(x_te, y_te, 255.0)
    return Dataset("cifar10", x_train, y_train, x_test, y_test, k, classes)
