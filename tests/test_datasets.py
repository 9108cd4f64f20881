import pickle

import numpy as np
import pytest

from memtool import datasets as D


def test_mnist_is_embedded_canonical_and_fingerprinted():
    ds = D.load_dataset("mnist", limit=1000)
    assert ds.x_train.shape == (1000, 1, 28, 28) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.y_train[:5].tolist() == [5, 0, 4, 1, 9]  # the standard MNIST order
    assert ds.fingerprint == D.load_dataset("mnist", limit=1000).fingerprint
    assert ds.fingerprint != D.load_dataset("mnist", limit=999).fingerprint
    full = D.load_dataset("mnist")
    assert len(full.y_train) == 60000


def test_label_noise_flips_exact_fraction_to_other_classes():
    ds = D.load_dataset("digits", label_noise=0.1, seed=3)
    flipped = ds.label_corrupted
    assert flipped.sum() == round(0.1 * len(ds.y_train))
    assert np.all(ds.y_train[flipped] != ds.original_label[flipped])
    assert np.array_equal(ds.y_train[~flipped], ds.original_label[~flipped])
    again = D.load_dataset("digits", label_noise=0.1, seed=3)
    assert np.array_equal(again.y_train, ds.y_train)
    other = D.load_dataset("digits", label_noise=0.1, seed=4)
    assert not np.array_equal(other.y_train, ds.y_train)
    assert ds.fingerprint != D.load_dataset("digits").fingerprint


def test_fashion_mnist_from_debian_files():
    if not D.FASHION_SYSTEM_DIR.exists():
        pytest.skip("dataset-fashion-mnist is not installed")
    ds = D.load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.y_test.shape == (10000,)
    assert ds.y_train[:3].tolist() == [9, 0, 0]


@pytest.mark.parametrize("name,what", [("cifar10", "cifar-10-binary.tar.gz"), ("cifar100", "cifar-100-binary.tar.gz"),
                                       ("tiny-imagenet", "tiny-imagenet-200.zip")])
def test_missing_dataset_says_what_to_download_and_where(tmp_path, name, what):
    with pytest.raises(D.MissingDatasetError) as e:
        D.load_dataset(name, data_root=tmp_path)
    assert what in str(e.value) and str(tmp_path) in str(e.value)


def test_cifar10_binary_format(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}.bin", 3) for i in range(1, 6)] + [("test_batch.bin", 2)]:
        rec = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], 1).astype(np.uint8)
        (folder / name).write_bytes(rec.tobytes())
    ds = D.load_dataset("cifar10", data_root=tmp_path)
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (2, 3, 32, 32)
    assert np.array_equal(ds.x_test.reshape(2, -1), rec[:, 1:]) and np.array_equal(ds.y_test, rec[:, 0])


def test_safe_unpickle_refuses_code():
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        D.safe_unpickle(pickle.dumps(Evil()))
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    back = D.safe_unpickle(pickle.dumps({b"data": arr, b"labels": [1, 2]}, protocol=2))
    assert np.array_equal(back[b"data"], arr)


def test_unknown_dataset_names_choices():
    with pytest.raises(ValueError, match="digits"):
        D.load_dataset("imagenet-21k")


def test_dataset_status_lists_every_dataset(tmp_path):
    rows = {r["name"]: r for r in D.dataset_status(tmp_path)}
    assert set(rows) == set(D.REGISTRY)
    assert rows["mnist"]["available"] and rows["digits"]["available"]
    assert not rows["cifar100"]["available"] and "cifar-100" in rows["cifar100"]["how_to_get"]


def write_tiny_imagenet(root, classes=3, per_class=2, val=4, seed=0):
    """A synthetic tiny-imagenet-200/ folder in the real layout (wnids, train/WNID/images, val)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = root / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(classes)]
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    img = lambda: Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))  # noqa: E731
    for w in wnids:
        (base / "train" / w / "images").mkdir(parents=True)
        for j in range(per_class):
            img().save(base / "train" / w / "images" / f"{w}_{j}.JPEG")
    (base / "val" / "images").mkdir(parents=True)
    lines = []
    for j in range(val):
        img().save(base / "val" / "images" / f"val_{j}.JPEG")
        lines.append(f"val_{j}.JPEG\t{wnids[j % classes]}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return wnids


def test_tiny_imagenet_folder_format(tmp_path):
    write_tiny_imagenet(tmp_path, classes=3, per_class=2, val=4)
    ds = D.load_dataset("tiny-imagenet", data_root=tmp_path)
    assert ds.x_train.shape == (6, 3, 64, 64) and ds.x_test.shape == (4, 3, 64, 64)
    assert ds.y_train.tolist() == [0, 0, 1, 1, 2, 2] and ds.y_test.tolist() == [0, 1, 2, 0]
    assert (tmp_path / "tiny-imagenet-200" / "memtool-uint8.npz").exists()  # cached: the second load reads it
    assert D.load_dataset("tiny-imagenet", data_root=tmp_path).fingerprint == ds.fingerprint


def _write_cifar100(folder, n_train=4, n_test=2, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for name, n in (("train.bin", n_train), ("test.bin", n_test)):
        rec = np.concatenate([rng.integers(0, 100, (n, 2)), rng.integers(0, 256, (n, 3072))], 1).astype(np.uint8)
        (folder / name).write_bytes(rec.tobytes())


def test_truncated_dataset_file_is_named(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    _write_cifar100(folder)
    (folder / "train.bin").write_bytes((folder / "train.bin").read_bytes()[:5000])  # a cut-short download
    with pytest.raises(D.DatasetFileError, match=r"train\.bin is truncated or corrupted .*download it again"):
        D.load_dataset("cifar100", data_root=tmp_path)
    gz = tmp_path / "fashion-mnist"
    gz.mkdir()
    import gzip

    for n in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]:
        (gz / f"{n}.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + (4).to_bytes(4, "big") + bytes(4))[:-6])
    with pytest.raises(D.DatasetFileError, match=r"train-images-idx3-ubyte\.gz is truncated or corrupted"):
        D._load_fashion(tmp_path)


def test_labels_out_of_range_are_named(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    _write_cifar100(folder)
    raw = bytearray((folder / "test.bin").read_bytes())
    raw[3074 + 1] = 140  # sample 1's fine label: CIFAR-100 has 100 classes
    (folder / "test.bin").write_bytes(bytes(raw))
    with pytest.raises(D.DatasetFileError, match=r"test labels must be in 0\.\.99 .*sample 1 has 140"):
        D.load_dataset("cifar100", data_root=tmp_path)


def test_user_npz_dataset_and_its_bad_values(tmp_path):
    rng = np.random.default_rng(0)
    good = dict(x_train=rng.random((20, 8, 8)), y_train=rng.integers(0, 3, 20), x_test=rng.random((6, 8, 8)),
                y_test=rng.integers(0, 3, 6))
    np.savez(tmp_path / "ok.npz", **good)
    ds = D.load_dataset(str(tmp_path / "ok.npz"))
    assert ds.x_train.shape == (20, 1, 8, 8) and ds.x_train.dtype == np.float32 and ds.num_classes == 3
    np.testing.assert_array_equal(ds.x_test[:, 0], good["x_test"].astype(np.float32))  # floats stay floats
    assert ds.input_range == (0.0, 1.0)
    cases = {
        "nan": ({"x_train": np.where(np.arange(20)[:, None, None] == 4, np.nan, good["x_train"])},
                r"x_train has 64 NaN or infinite pixels \(first in sample 4\)"),
        "range": ({"x_test": good["x_test"] * 2}, r"x_test pixels must be in \[0, 1\] .*rescale"),
        "labels": ({"y_test": np.array([0, 1, 2, 5, 1, 0]), "num_classes": 3},
                   r"y_test labels must be in 0\.\.2; sample 3 has 5"),
        "missing": ({"x_test": None}, r"lacks \['x_test'\]"),
        "count": ({"y_train": good["y_train"][:19]}, "20 train samples in x_train but 19 labels"),
    }
    for name, (change, message) in cases.items():
        arrays = {k: v for k, v in {**good, **change}.items() if v is not None}
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(D.DatasetFileError, match=message):
            D.load_dataset(str(tmp_path / f"{name}.npz"))
    (tmp_path / "pickled.npz").write_bytes(b"not a zip")
    with pytest.raises(D.DatasetFileError, match="not a readable .npz"):
        D.load_dataset(str(tmp_path / "pickled.npz"))


def test_cli_names_a_bad_data_root_and_a_bad_dataset_file(tmp_path, capsys):
    from memtool.cli import main

    assert main(["train", "--dataset", "cifar100", "--data-root", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "CIFAR-100 not found" in err and str(tmp_path / "nowhere") in err and "Traceback" not in err
    _write_cifar100(tmp_path / "cifar-100-binary", n_train=3)
    (tmp_path / "cifar-100-binary" / "test.bin").write_bytes(b"\0" * 100)
    assert main(["estimate", "--dataset", "cifar100", "--data-root", str(tmp_path), "--out", str(tmp_path / "e"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "test.bin is truncated or corrupted" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()
