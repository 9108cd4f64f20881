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
