"""CIFAR-10 loading from files written here in the python release's format (there is no network):
a gzipped tar with the real member names, holding Python-2-style pickled dicts. Shapes, ranges,
channel order, the extracted-folder layout, the t10k split, and each error path: missing, truncated,
corrupt, wrong member, wrong content, a pickle that asks for a forbidden global, a wrong hash."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch

from robustfl_lib import data as D
from robustfl_lib import data_cifar as C
from robustfl_lib import load_dataset

CLASSES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2's cPickle wrote str (SHORT_BINSTRING / BINSTRING), as in the real
    batches; Python 3's protocol 2 would instead call ``_codecs.encode``, which the real files never do."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # The official files name numpy's reconstruction function by its numpy 1 home.
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def batch(n: int, start: int, rng) -> dict:
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return {b"batch_label": b"fake batch", b"labels": [(start + i) % 10 for i in range(n)], b"data": data,
            b"filenames": [b"img_%d.png" % i for i in range(n)]}


def fake_members(n_train=4, n_test=20, seed=0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    members = {name: py2_pickle(batch(n_train, i, rng)) for i, name in enumerate(C.TRAIN_BATCHES)}
    members[C.TEST_BATCH] = py2_pickle(batch(n_test, 0, rng))
    members[C.META] = py2_pickle({b"num_cases_per_batch": n_train, b"label_names": CLASSES, b"num_vis": 3072})
    return members


def write_archive(root, members: dict[str, bytes], folder=C.FOLDER):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, raw in {**members, "readme.html": b"<html></html>"}.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    root.mkdir(parents=True, exist_ok=True)
    path = root / C.ARCHIVE
    path.write_bytes(buf.getvalue())
    return path


def test_the_pickles_here_are_in_the_real_format():
    raw = fake_members()[C.TEST_BATCH]
    # The globals the official files name, and no others (no _codecs.encode: bytes are py2 strings).
    import pickletools

    globals_named = {arg for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}
    assert globals_named == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    assert pickle.loads(raw, encoding="bytes")[b"data"].shape == (20, 3072)


def test_load_shapes_ranges_labels_and_channel_order(tmp_path):
    members = fake_members()
    write_archive(tmp_path, members)
    ds = load_dataset("cifar10", root=tmp_path)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (20, 3, 32, 32)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert 0 <= ds.x_train.min() and ds.x_train.max() <= 1 and ds.num_classes == 10
    assert ds.class_names == tuple(c.decode() for c in CLASSES) and ds.input_shape == (3, 32, 32)
    # Batches in order 1..5; a row is the red plane, then green, then blue, each row-major.
    first = pickle.loads(members["data_batch_1"], encoding="bytes")
    third = pickle.loads(members["data_batch_3"], encoding="bytes")
    row = first[b"data"][1].astype(np.float32) / 255
    assert ds.x_train[1, 0, 0, 0].item() == pytest.approx(row[0])
    assert ds.x_train[1, 1, 0, 0].item() == pytest.approx(row[1024])
    assert ds.x_train[1, 2, 31, 31].item() == pytest.approx(row[3071])
    assert ds.x_train[1, 0, 1, 0].item() == pytest.approx(row[32])
    assert ds.y_train[:4].tolist() == first[b"labels"] and ds.y_train[8:12].tolist() == third[b"labels"]
    np.testing.assert_array_equal(ds.y_test.numpy(), np.arange(20) % 10)


def test_extracted_folder_loads_the_same(tmp_path):
    members = fake_members()
    write_archive(tmp_path / "a", members)
    folder = tmp_path / "b" / C.FOLDER
    folder.mkdir(parents=True)
    for name, raw in members.items():
        (folder / name).write_bytes(raw)
    a, b = load_dataset("cifar10", root=tmp_path / "a"), load_dataset("cifar10", root=tmp_path / "b")
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    (folder / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        load_dataset("cifar10", root=tmp_path / "b")


def test_t10k_split_uses_the_test_batch_only(tmp_path):
    write_archive(tmp_path, fake_members(n_test=50))
    ds = load_dataset("cifar10", root=tmp_path, files="t10k", test_fraction=0.2, seed=0)
    assert ds.x_train.shape == (40, 3, 32, 32) and ds.x_test.shape == (10, 3, 32, 32)
    assert sorted(ds.y_test.tolist()) == list(range(10))  # stratified: one of each class
    with pytest.raises(ValueError, match="files must be"):
        load_dataset("cifar10", root=tmp_path, files="train")


def test_missing_archive_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-python.tar.gz is missing.*download=True"):
        load_dataset("cifar10", root=tmp_path)


def test_truncated_archive(tmp_path):
    path = write_archive(tmp_path, fake_members())
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(D.CIFARError, match="cifar-10-python.tar.gz.*truncated"):
        load_dataset("cifar10", root=tmp_path)


def test_corrupt_archive(tmp_path):
    path = write_archive(tmp_path, fake_members())
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 16] = bytes(b ^ 0xFF for b in raw[mid : mid + 16])  # damage the deflate stream
    path.write_bytes(bytes(raw))
    with pytest.raises(D.CIFARError, match="cifar-10-python.tar.gz.*(corrupt|truncated)"):
        load_dataset("cifar10", root=tmp_path)
    path.write_bytes(b"this is not a gzip file at all")
    with pytest.raises(D.CIFARError, match="gzip"):
        load_dataset("cifar10", root=tmp_path)
    path.write_bytes(gzip.compress(b"a gzip stream, but no tar archive inside" * 20))
    with pytest.raises(D.CIFARError, match="not a readable tar archive"):
        load_dataset("cifar10", root=tmp_path)


def test_wrong_members(tmp_path):
    members = fake_members()
    del members["data_batch_3"]
    write_archive(tmp_path, members)
    with pytest.raises(D.CIFARError, match="no member cifar-10-batches-py/data_batch_3"):
        load_dataset("cifar10", root=tmp_path)
    write_archive(tmp_path, fake_members(), folder="cifar-100-python")  # another release's layout
    with pytest.raises(D.CIFARError, match="not the CIFAR-10 python release"):
        load_dataset("cifar10", root=tmp_path)


def test_truncated_pickle_inside_a_good_archive(tmp_path):
    members = fake_members()
    members["data_batch_2"] = members["data_batch_2"][:-100]
    write_archive(tmp_path, members)
    with pytest.raises(D.CIFARError, match="data_batch_2.*truncated or corrupt"):
        load_dataset("cifar10", root=tmp_path)


@pytest.mark.parametrize("change,message", [
    (lambda b: b.pop(b"labels"), "b'data' and b'labels'"),
    (lambda b: b.update({b"data": b[b"data"][:, :3000]}), r"uint8 array of shape \(N, 3072\)"),
    (lambda b: b.update({b"data": b[b"data"].astype(np.int16)}), "uint8"),
    (lambda b: b.update({b"labels": b[b"labels"][:-1]}), "4 images but 3 labels"),
    (lambda b: b.update({b"labels": [0, 1, 2, 10]}), "label 10 outside 0..9"),
    (lambda b: b.update({b"labels": [0, 1, 2, -1]}), "label -1 outside"),
    (lambda b: b.update({b"labels": [0, 1, 2, 0.5]}), "list of integers"),
])
def test_batches_with_wrong_content(tmp_path, change, message):
    members = fake_members()
    b = batch(4, 0, np.random.default_rng(1))
    change(b)
    members["data_batch_5"] = py2_pickle(b)
    write_archive(tmp_path, members)
    with pytest.raises(D.CIFARError, match=f"data_batch_5.*{message}"):
        load_dataset("cifar10", root=tmp_path)


def test_meta_with_wrong_class_names(tmp_path):
    members = fake_members()
    members[C.META] = py2_pickle({b"label_names": CLASSES[:9]})
    write_archive(tmp_path, members)
    with pytest.raises(D.CIFARError, match="batches.meta.*10 class names"):
        load_dataset("cifar10", root=tmp_path)


_CALLED = []


def _side_effect(*args):  # what a malicious pickle would run; the unpickler must never reach it
    _CALLED.append(args)
    return {b"data": np.zeros((0, 3072), np.uint8), b"labels": []}


class _Evil:
    def __reduce__(self):
        return (_side_effect, ("pwned",))


@pytest.mark.parametrize("payload", [_Evil(), {b"data": _Evil(), b"labels": []}])
def test_unpickling_refuses_any_other_global(payload):
    raw = py2_pickle(payload)
    assert pickle.loads(raw, encoding="bytes") is not None and _CALLED  # an ordinary pickle.load would run it
    _CALLED.clear()
    with pytest.raises(D.CIFARError, match="evil: the pickle asks for .*_side_effect, which is not allowed"):
        C.read_cifar_batch(raw, "evil")
    assert _CALLED == []


def test_forbidden_global_in_the_archive_names_the_member(tmp_path):
    members = fake_members()
    members["data_batch_1"] = py2_pickle({b"data": os.getcwd, b"labels": []})
    write_archive(tmp_path, members)
    with pytest.raises(D.CIFARError, match="data_batch_1.*(posix|nt).getcwd, which is not allowed"):
        load_dataset("cifar10", root=tmp_path)


def test_download_checks_the_hash_and_writes_atomically(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    write_archive(mirror, fake_members())
    cache = tmp_path / "cache"
    # The official md5 (the fake archive cannot match it): refused, nothing left behind.
    assert D.DATASETS["cifar10"]["md5"] == "c58f30108f718f92721af3b95e74349a"
    monkeypatch.setitem(D.DATASETS, "cifar10", dict(D.DATASETS["cifar10"], mirrors=(mirror.as_uri() + "/",)))
    with pytest.raises(RuntimeError, match="md5 .* != expected c58f30108f718f92721af3b95e74349a"):
        load_dataset("cifar10", root=cache, download=True)
    assert list(cache.iterdir()) == []
    # With the archive's own md5 it is fetched, checked and renamed into place.
    md5 = hashlib.md5((mirror / C.ARCHIVE).read_bytes()).hexdigest()
    monkeypatch.setitem(D.DATASETS, "cifar10", dict(D.DATASETS["cifar10"], md5=md5))
    ds = load_dataset("cifar10", root=cache, download=True)
    assert ds.x_train.shape == (20, 3, 32, 32)
    assert [p.name for p in cache.iterdir()] == [C.ARCHIVE]
    # A damaged archive in the cache is replaced by download=True (its md5 differs).
    (cache / C.ARCHIVE).write_bytes(b"damaged")
    with pytest.raises(D.CIFARError):
        load_dataset("cifar10", root=cache)
    assert load_dataset("cifar10", root=cache, download=True).x_test.shape == (20, 3, 32, 32)


def test_a_federated_run_reads_cifar10_through_its_config(tmp_path):
    # FLConfig names the dataset and its folder; the CIFAR CNN (BatchNorm) is sized from it and trains.
    write_archive(tmp_path, fake_members(n_train=4, n_test=10))
    from robustfl_lib import FLConfig, run_federated

    cfg = FLConfig(dataset="cifar10", dataset_kwargs={"root": str(tmp_path)}, model="cifar_cnn", num_clients=2,
                   rounds=1, local_epochs=1, batch_size=5, progress=False)
    result = run_federated(cfg)
    assert result.model.input_shape == (3, 32, 32) and len(result.history) == 1
    assert 0.0 <= result.history[0]["clean_accuracy"] <= 1.0
