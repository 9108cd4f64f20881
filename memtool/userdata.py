"""A user's own data: arrays of any feature shape, any map-style torch Dataset, an image folder.

    data = memtool.ArrayData(x_train, y_train, x_test, y_test, name="breast-cancer")
    data = memtool.ArrayData.from_torch(train_ds, test_ds, name="my-images")   # ImageFolder, HF, ...
    memtool.estimate("runs/mine", dataset=data, model=build, trials=64)

On the command line a dataset is a registered name, ``npz:PATH``, ``imagefolder:DIR``
(DIR/train and DIR/test in torchvision's layout) or ``MODULE:FUNCTION`` (a function returning an
``ArrayData`` or the tuple ``(x_train, y_train, x_test, y_test)``; imported only because the
user named it). Run directories record ``npz:`` and ``imagefolder:`` by absolute path, and every
dataset by its fingerprint.

Arrays given in Python (and MODULE:FUNCTION data) are kept in this process under their name
(:func:`register_data`): :func:`memtool.datasets.load_dataset` finds them there, workers get
them with their task, and a run made from them is reopened by passing the same data again
(checked by fingerprint): a run directory never imports code by itself.

**Input range.** Attacks clip to the range the data declare: images are in [0, 1] (uint8
pixels are scaled; float images must lie in [0, 1]); feature vectors (2-D arrays) declare
none, and an attack on them is refused with a message that says so.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import numpy as np

from .datasets import Dataset, DatasetFileError

_IN_MEMORY: dict[str, Dataset] = {}
MODULE_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
IMAGE_RANGE = (0.0, 1.0)


def _check(name: str, x: np.ndarray, y: np.ndarray, split: str, num_classes: int | None, input_range) -> None:
    where = f"dataset {name}: x_{split}"
    if x.ndim < 2:
        raise DatasetFileError(f"{where} must have one row per sample (n, ...), got shape {x.shape}")
    if len(x) != len(y):
        raise DatasetFileError(f"dataset {name}: {len(x)} {split} samples in x_{split} but {len(y)} labels in "
                               f"y_{split}: give one label per sample")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DatasetFileError(f"dataset {name}: y_{split} must be a 1-D array of integer labels, got {y.dtype} "
                               f"of shape {y.shape}")
    if num_classes is not None and len(y) and (y.min() < 0 or y.max() >= num_classes):
        bad = int(np.argmax((y < 0) | (y >= num_classes)))
        raise DatasetFileError(f"dataset {name}: y_{split} labels must be in 0..{num_classes - 1}; sample {bad} has "
                               f"{int(y[bad])}")
    if x.dtype == np.uint8:
        return
    if not np.issubdtype(x.dtype, np.floating):
        raise DatasetFileError(f"{where} must be uint8 pixels or floats, got dtype {x.dtype}")
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(1)
    if bad.any():
        raise DatasetFileError(f"{where} has NaN or infinite values in {int(bad.sum())} samples (first: sample "
                               f"{int(np.argmax(bad))}): impute or drop them")
    if input_range is not None and len(x) and (x.min() < input_range[0] or x.max() > input_range[1]):
        raise DatasetFileError(f"{where} holds values {float(x.min()):g}..{float(x.max()):g} outside its declared "
                               f"input range {list(input_range)}: rescale to [0, 1]"
                               + (" (pixels 0..255: give them as uint8)" if x.min() >= 0 and x.max() <= 255 else "")
                               + ", or declare input_range=None (features; no attacks)")


def _listing(values, most: int = 8) -> str:
    shown = ", ".join(str(int(v)) for v in values[:most])
    return shown + (f" (and {len(values) - most} more)" if len(values) > most else "")


class ArrayData(Dataset):
    """A dataset from arrays: ``x`` of any per-sample shape ((n, C, H, W) images, (n, d)
    features, ...), integer labels 0..num_classes-1. uint8 arrays are images scaled to [0, 1]
    per batch; floats stay floats (float32). ``input_range``: the range attacks clip to,
    by default [0, 1] for uint8 or image-shaped (n, C, H, W) / (n, H, W) data, none for the rest."""

    def __init__(self, x_train, y_train, x_test, y_test, *, name: str = "arrays", num_classes: int | None = None,
                 input_range="auto"):
        xtr, xte = (np.asarray(a) for a in (x_train, x_test))
        ytr, yte = (np.asarray(a) for a in (y_train, y_test))
        if xtr.dtype != np.uint8:
            xtr, xte = (a.astype(np.float32, copy=False) if np.issubdtype(a.dtype, np.number) else a
                        for a in (xtr, xte))
        if xtr.ndim == 3 and xtr.dtype == np.uint8:  # (n, H, W) grey images
            xtr, xte = xtr[:, None], xte[:, None]
        if input_range == "auto":
            input_range = IMAGE_RANGE if xtr.dtype == np.uint8 or xtr.ndim == 4 else None
        if input_range is not None and tuple(input_range) != IMAGE_RANGE:
            raise ValueError(f"input_range must be [0, 1] (images) or None (features; no attacks), got {input_range}: "
                             "rescale the data to [0, 1]")
        inferred = num_classes is None
        num_classes = int(max(ytr.max(initial=0), yte.max(initial=0))) + 1 if inferred else int(num_classes)
        for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
            _check(name, x, y, split, num_classes, input_range)
        empty = np.setdiff1d(np.arange(num_classes), ytr)
        if len(empty) and inferred:  # 1-based labels, or test classes that training never sees
            raise DatasetFileError(f"dataset {name}: labels are taken as classes 0..{num_classes - 1} (the largest "
                                   f"label + 1), but no training sample has class {_listing(empty)}: give labels "
                                   "0..K-1 (np.unique(y_train, return_inverse=True) renumbers them), or pass "
                                   "num_classes=K to keep classes without training samples")
        if xtr.shape[1:] != xte.shape[1:]:
            raise DatasetFileError(f"dataset {name}: train samples have shape {xtr.shape[1:]}, test samples "
                                   f"{xte.shape[1:]}")
        ytr, yte = ytr.astype(np.int64), yte.astype(np.int64)
        super().__init__(name=name, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, num_classes=num_classes,
                         original_label=ytr, meta={}, input_range=None if input_range is None else IMAGE_RANGE)

    @classmethod
    def from_torch(cls, train, test, *, name: str, cache: str | Path | None = None, input_range="auto",
                   num_classes: int | None = None, progress: bool = True) -> "ArrayData":
        """Materialize two map-style torch Datasets (``ds[i] -> (x, y)``: an ImageFolder, a
        HuggingFace dataset in torch format, your own) once. With ``cache`` (a folder) the
        arrays are written there as .npy files and memory-mapped, and a later call with the
        same folder reads them instead of iterating the datasets again."""
        arrays = []
        for split, ds in (("train", train), ("test", test)):
            files = None if cache is None else (Path(cache) / f"x_{split}.npy", Path(cache) / f"y_{split}.npy")
            if files and all(f.exists() for f in files):
                arrays += [np.load(files[0], mmap_mode="r"), np.load(files[1])]
                continue
            x, y = _materialize(ds, f"{name} {split}", progress)
            if files:
                files[0].parent.mkdir(parents=True, exist_ok=True)
                for f, a in zip(files, (x, y)):
                    tmp = f.with_suffix(".tmp.npy")
                    np.save(tmp, a)
                    tmp.replace(f)
                x = np.load(files[0], mmap_mode="r")
            arrays += [x, y]
        return cls(*arrays, name=name, num_classes=num_classes, input_range=input_range)


def _as_array(v, what: str) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        return v.detach().cpu().numpy()
    if hasattr(v, "mode") and hasattr(v, "size") and hasattr(v, "getdata"):  # a PIL image: HWC / HW uint8
        a = np.asarray(v)
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    a = np.asarray(v)
    if a.dtype == object:
        raise DatasetFileError(f"{what}: cannot turn {type(v).__name__} into an array")
    return a


def _materialize(ds, what: str, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """All samples of a map-style dataset as (x, y) arrays, in index order."""
    from .progress import progress_bar

    n = len(ds)
    if n == 0:
        raise DatasetFileError(f"{what}: the dataset is empty")
    x = y = None
    for i in progress_bar(range(n), total=n, desc=f"materialize {what}", unit="sample", disable=not progress):
        item = ds[i]
        if isinstance(item, dict):  # HuggingFace rows
            keys = [k for k in ("image", "img", "pixel_values", "x", "features") if k in item]
            lab = [k for k in ("label", "labels", "y") if k in item]
            if not keys or not lab:
                raise DatasetFileError(f"{what}: sample {i} is a dict with keys {sorted(item)}; expected an input "
                                       "(image / pixel_values / x) and a label (label / y)")
            item = (item[keys[0]], item[lab[0]])
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DatasetFileError(f"{what}: sample {i} is {type(item).__name__}"
                                   f"{f' of length {len(item)}' if hasattr(item, '__len__') else ''}; a dataset "
                                   "must return (x, y) pairs")
        xi, yi = _as_array(item[0], f"{what}: sample {i}"), _as_array(item[1], f"{what}: label {i}")
        if yi.size != 1 or not np.issubdtype(yi.dtype, np.integer):
            raise DatasetFileError(f"{what}: sample {i}'s label is {item[1]!r}; labels must be single integers")
        if x is None:
            x = np.empty((n, *xi.shape), dtype=np.uint8 if xi.dtype == np.uint8 else np.float32)
            y = np.empty(n, np.int64)
        if xi.shape != x.shape[1:]:
            raise DatasetFileError(f"{what}: sample {i} has shape {xi.shape}, sample 0 has {x.shape[1:]}: resize "
                                   "the inputs to one shape (a transform of the dataset)")
        x[i], y[i] = xi, int(yi.reshape(()))
    return x, y


def _image_folder(root: Path, split: str):
    from PIL import Image
    from torchvision.datasets import ImageFolder

    def load(path):  # keep the image's own channels (ImageFolder's default forces RGB)
        with Image.open(path) as im:
            im.load()
            return im if im.mode in ("L", "RGB") else im.convert("RGB")

    return ImageFolder(str(root / split), loader=load)


def image_folder(path: str | Path, progress: bool = False) -> ArrayData:
    """DIR/train/CLASS/*.png and DIR/test/CLASS/*.png (torchvision's layout; classes in sorted
    order), materialized into uint8 arrays cached in DIR/.memtool-cache (refreshed when the
    folder's file list changes)."""
    root = Path(path).resolve()
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DatasetFileError(f"imagefolder:{root}: no {split}/ folder; expected {root}/train/CLASS/*.png and "
                                   f"{root}/test/CLASS/*.png")
    train, test = _image_folder(root, "train"), _image_folder(root, "test")
    if train.classes != test.classes:
        raise DatasetFileError(f"imagefolder:{root}: train classes {train.classes} differ from test classes "
                               f"{test.classes}")
    import hashlib

    listing = hashlib.sha256(repr([(p, c) for p, c in train.samples + test.samples]).encode()).hexdigest()[:12]
    return ArrayData.from_torch(train, test, name=f"imagefolder:{root}", cache=root / ".memtool-cache" / listing,
                                num_classes=len(train.classes), progress=progress)


def register_data(data: Dataset) -> str:
    """Keep ``data`` in this process under its name (what ``load_dataset(name)`` then returns)."""
    _IN_MEMORY[data.name] = data
    return data.name


def in_memory(name: str) -> Dataset | None:
    return _IN_MEMORY.get(name)


def resolve_dataset(dataset) -> str:
    """The dataset a user named (a command-line value or a ``dataset=`` argument), as the
    string a run records: a name as it is, ``npz:`` with an absolute path, an ``ArrayData`` or a
    tuple of arrays registered in this process, MODULE:FUNCTION imported and called (only
    here: the user named it)."""
    if isinstance(dataset, Dataset):
        return register_data(dataset)
    if isinstance(dataset, tuple):
        return register_data(ArrayData(*dataset))
    if not isinstance(dataset, str):
        raise ValueError(f"dataset must be a name, npz:PATH, imagefolder:DIR, MODULE:FUNCTION, an ArrayData or a "
                         f"tuple (x_train, y_train, x_test, y_test); got {type(dataset).__name__}")
    if dataset.endswith(".npz") and not dataset.startswith("npz:"):
        dataset = "npz:" + dataset
    if dataset.startswith(("npz:", "imagefolder:")):
        kind, _, path = dataset.partition(":")
        return f"{kind}:{Path(path).resolve()}"
    if MODULE_SPEC.fullmatch(dataset):
        module, _, attr = dataset.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--dataset {dataset}: cannot import it ({type(e).__name__}: {e})") from None
        try:
            data = fn()
        except Exception as e:  # the user's code failed: say which flag named it, and what it raised
            raise ValueError(f"--dataset {dataset}: calling {attr}() raised {type(e).__name__}: {e}") from e
        data = ArrayData(*data, name=dataset) if isinstance(data, tuple) else data
        if not isinstance(data, Dataset):
            raise ValueError(f"--dataset {dataset} returned {type(data).__name__}; it must return an ArrayData or "
                             "(x_train, y_train, x_test, y_test)")
        return register_data(data if data.name == dataset else _renamed(data, dataset))
    return dataset


def given_for_run(dataset, run) -> None:
    """The data ``run`` was made with, named again by the user in any form
    :func:`resolve_dataset` takes, known from now on under the name the run recorded, once
    their fingerprint (after the run's limit and label noise) is the run's: a run made from
    arrays in Python reopens from the command line with the same arrays in an npz file."""
    from .datasets import REGISTRY, load_dataset
    from .estimator.store import read_run_json

    meta = read_run_json(run)
    cfg, name = meta["config"], resolve_dataset(dataset)
    recorded = cfg["dataset"]
    if name == recorded:
        return
    if recorded in REGISTRY:
        raise ValueError(f"{run} was made with the built-in dataset {recorded}: give no --dataset")
    used = load_dataset(name, limit=cfg.get("limit"), label_noise=cfg.get("label_noise", 0.0), seed=cfg.get("seed", 0))
    if used.fingerprint != meta["dataset"]["fingerprint"]:
        raise ValueError(f"the data given ({name}) are not those {run} was made with: fingerprint {used.fingerprint} "
                         f"after its limit and label noise, the run's {meta['dataset']['fingerprint']}")
    register_data(_renamed(load_dataset(name), recorded))


def _renamed(data: Dataset, name: str) -> Dataset:
    from dataclasses import fields

    return Dataset(**{**{f.name: getattr(data, f.name) for f in fields(Dataset)}, "name": name})


def user_dataset(settings: dict) -> dict:
    """``settings`` with the dataset the user named resolved (:func:`resolve_dataset`)."""
    if "dataset" not in settings or settings["dataset"] is None:
        return settings
    return {**settings, "dataset": resolve_dataset(settings["dataset"])}
