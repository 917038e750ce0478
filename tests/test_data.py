"""Datasets: offline digits, the IDX parser (real, truncated, corrupt, missing), atomic downloads."""

from __future__ import annotations

import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch

from robustfl_lib import data as D
from robustfl_lib import load_dataset, read_idx


def test_digits_offline_shapes_and_ranges(digits):
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.x_train.shape[1:] == (1, 8, 8) and digits.input_shape == (1, 8, 8)
    assert len(digits.x_train) + len(digits.x_test) == 1797
    assert len(digits.x_test) == pytest.approx(0.2 * 1797, abs=1)
    for x in (digits.x_train, digits.x_test):
        assert x.min() >= 0 and x.max() <= 1 and x.max() == 1
    assert digits.num_classes == 10


def test_digits_split_is_stratified_and_seeded(digits):
    train_frac = np.bincount(digits.y_train.numpy()) / len(digits.y_train)
    test_frac = np.bincount(digits.y_test.numpy()) / len(digits.y_test)
    assert np.abs(train_frac - test_frac).max() < 0.01
    again = load_dataset("digits", seed=0)
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_test, digits.y_test)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.y_train, digits.y_train)


def test_unknown_dataset_and_bad_options():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.5)


def write_idx(path, array: np.ndarray, code=0x08, gz=True):
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return payload


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dtype,code", [(np.uint8, 0x08), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)])
def test_read_idx_round_trip(tmp_path, gz, dtype, code):
    arr = (np.arange(2 * 3 * 4) % 100).astype(dtype).reshape(2, 3, 4)
    path = tmp_path / "x.idx"
    write_idx(path, arr, code, gz)
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, arr)


def test_read_idx_truncated_payload_names_file(tmp_path):
    path = tmp_path / "short-images-idx3-ubyte.gz"
    payload = write_idx(path, np.zeros((5, 4, 4), np.uint8))
    path.write_bytes(gzip.compress(payload[:-7]))
    with pytest.raises(D.IDXError, match="short-images-idx3-ubyte.gz.*truncated"):
        read_idx(path)


def test_read_idx_trailing_bytes(tmp_path):
    path = tmp_path / "long.idx"
    payload = write_idx(path, np.zeros((2, 2), np.uint8), gz=False)
    path.write_bytes(payload + b"\x00")
    with pytest.raises(D.IDXError, match="trailing bytes"):
        read_idx(path)


def test_read_idx_truncated_gzip_stream(tmp_path):
    path = tmp_path / "cut.gz"
    write_idx(path, np.arange(1000, dtype=np.uint8).reshape(10, 100))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(D.IDXError, match="cut.gz.*gzip"):
        read_idx(path)


def test_read_idx_corrupt_gzip_and_bad_magic(tmp_path):
    path = tmp_path / "bad.gz"
    write_idx(path, np.ones((3, 3), np.uint8))
    raw = bytearray(path.read_bytes())
    raw[12:20] = b"\xff" * 8  # damage the deflate stream
    path.write_bytes(bytes(raw))
    with pytest.raises(D.IDXError, match="bad.gz"):
        read_idx(path)
    junk = tmp_path / "junk.idx"
    junk.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(D.IDXError, match="magic"):
        read_idx(junk)
    code = tmp_path / "code.idx"
    code.write_bytes(b"\x00\x00\x42\x01\x00\x00\x00\x01\x00")
    with pytest.raises(D.IDXError, match="type code"):
        read_idx(code)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gz"):
        read_idx(tmp_path / "nope.gz")


def test_load_mnist_missing_file_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.gz.*download=True"):
        load_dataset("mnist", root=tmp_path)


def test_load_fake_mnist_from_written_idx(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 20)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    ds = load_dataset("fashion_mnist", root=tmp_path)
    assert ds.x_train.shape == (30, 1, 28, 28) and ds.x_test.shape == (20, 1, 28, 28)
    assert ds.x_train.max() <= 1 and ds.class_names[0] == "T-shirt/top"
    # A label file that disagrees with its image file is an error, not a silent misalignment.
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(19, np.uint8))
    with pytest.raises(D.IDXError, match="do not match"):
        load_dataset("fashion_mnist", root=tmp_path)


def test_real_mnist_test_files(mnist_dir):
    images = read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    # Published facts about the official test set: its first label is a 7; 1,135 ones.
    assert labels[0] == 7 and int((labels == 1).sum()) == 1135
    assert D._md5(mnist_dir / "t10k-images-idx3-ubyte.gz") == D._MNIST_MD5["t10k-images-idx3-ubyte.gz"]


def test_real_mnist_t10k_split(mnist_dir):
    ds = load_dataset("mnist", root=mnist_dir, files="t10k", test_fraction=0.2, seed=0)
    assert ds.x_train.shape == (8000, 1, 28, 28) and ds.x_test.shape == (2000, 1, 28, 28)
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0


def test_download_checks_hash_and_is_atomic(tmp_path):
    good = tmp_path / "src-good.bin"
    good.write_bytes(b"hello robustfl")
    bad = tmp_path / "src-bad.bin"
    bad.write_bytes(b"tampered bytes")
    md5 = hashlib.md5(good.read_bytes()).hexdigest()
    dest = tmp_path / "out" / "file.gz"
    # A mirror with the wrong bytes is refused and leaves nothing behind.
    with pytest.raises(RuntimeError, match="md5"):
        D.download_file([bad.as_uri()], dest, md5)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    # A dead mirror is skipped; the next good one is used.
    D.download_file([(tmp_path / "missing").as_uri(), bad.as_uri(), good.as_uri()], dest, md5)
    assert dest.read_bytes() == b"hello robustfl"
    assert [p.name for p in dest.parent.iterdir()] == ["file.gz"]


def test_download_via_load_dataset_uses_mirrors(tmp_path, monkeypatch):
    src = tmp_path / "mirror"
    src.mkdir()
    arrays = {"train": 12, "t10k": 6}
    fake = {}
    for prefix, n in arrays.items():
        for kind, arr in (("images-idx3", np.full((n, 28, 28), 7, np.uint8)), ("labels-idx1", np.arange(n, dtype=np.uint8) % 10)):
            name = f"{prefix}-{kind}-ubyte.gz"
            write_idx(src / name, arr)
            fake[name] = hashlib.md5((src / name).read_bytes()).hexdigest()
    monkeypatch.setitem(D.DATASETS, "mnist", dict(D.DATASETS["mnist"], md5=fake, mirrors=(src.as_uri() + "/",)))
    ds = load_dataset("mnist", root=tmp_path / "cache", download=True)
    assert ds.x_train.shape == (12, 1, 28, 28)
    assert torch.allclose(ds.x_test, torch.full_like(ds.x_test, 7 / 255))
