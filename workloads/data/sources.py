"""Labelled data sources: each returns a `LabelledData` (train and test tensors with integer labels).

Vector sources give float tensors (N, D); image sources give uint8 tensors (N, 3 or 1, H, W), which the
backbone's transform turns into floats. Nothing here downloads unless `download: true` is asked for.
"""
from __future__ import annotations

import logging
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from workloads.config import KeyInitData

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data source could not be read: the message names the path or option and what is expected."""


@dataclass
class LabelledData:
    """Train and test splits of one labelled source, with the names of its classes.

    A loader may fill it with numpy arrays as read (any numeric dtype, float labels) and leave num_classes and
    class_names None to have them inferred from the labels; `load_source` hands out only what `check_labelled`
    returns: float32 or uint8 inputs, int64 labels in [0, num_classes), every field set."""

    x_train: torch.Tensor
    y_train: torch.Tensor  # int64, values in [0, num_classes)
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int | None
    class_names: list[str] | None
    d_train: torch.Tensor | None = None  # int64 stage (domain) ids, one per sample: data.stream: user
    d_test: torch.Tensor | None = None


SOURCES: dict[str, Callable[..., LabelledData]] = {}


def register_source(name: str):
    """Decorator: add a loader to the SOURCES registry under `name`."""
    def deco(fn):
        SOURCES[name] = fn
        return fn
    return deco


def load_source(cfg) -> LabelledData:
    """Load the source a DataConfig (or KeyInitData) names."""
    if cfg.source not in SOURCES:
        raise DataError(f"data.source: unknown source {cfg.source!r}; accepted: {', '.join(sorted(SOURCES))}")
    training = not isinstance(cfg, KeyInitData)  # a key-init source is read for its inputs only
    data = check_labelled(SOURCES[cfg.source](cfg), _where(cfg), training=training)
    log.info("data %s: %d train / %d test samples, %d classes, input %s", cfg.source, len(data.y_train),
             len(data.y_test), data.num_classes, tuple(data.x_train.shape[1:]))
    return data


# --- checks at the door: every loader's arrays, before any work is done on them -------------------------------

# npz files declare no class count: the largest label + 1 is taken, so one stray id must not size every head and
# matrix (1e9 classes would be gigabytes). A label may exceed the sample count (ids need not be contiguous), but
# not by this factor, nor this absolute bound.
CLASSES_PER_SAMPLE = 100
MAX_CLASSES = 1_000_000
INPUT_LAYOUTS = "vectors (N, D) or images (N, C, H, W) with C = 1 (grey) or 3 (RGB)"
SPLITS = ("train", "test")


def _where(cfg) -> str:
    """The config key and file a source's data came from, as error messages start."""
    prefix = "learner.key_init_data" if isinstance(cfg, KeyInitData) else "data"
    if cfg.source in ("npz", "image_folder", "cifar10", "cifar100") and cfg.root is not None:
        path = Path(cfg.root).expanduser()
        if cfg.source in CIFAR_LAYOUT:
            path = path / CIFAR_LAYOUT[cfg.source][0]
        return f"{prefix}.root: {path}"
    return f"{prefix}.source: {cfg.source}"


def _value(v) -> str:
    """A label as a message shows it: 0.7, nan, 1000000000 (a whole float as the integer it stands for)."""
    if isinstance(v, (float, np.floating)):
        return str(int(v)) if math.isfinite(v) and float(v).is_integer() else f"{v:.7g}"
    return str(v)


def check_input_layout(shape: tuple[int, ...], dtype, name: str, where: str) -> None:
    """Refuse inputs that are neither numbers nor vectors (N, D) / images (N, C, H, W) with C in {1, 3}."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        raise DataError(f"{where}: {name} has dtype {dtype}; accepted: numbers (uint8 images, or ints / floats)")
    shape = tuple(int(n) for n in shape)
    if len(shape) == 4 and shape[1] not in (1, 3):
        hint = " (channels last? store them as (N, C, H, W))" if shape[3] in (1, 3) else ""
        raise DataError(f"{where}: {name} has shape {shape}: {shape[1]} channels{hint}; accepted: {INPUT_LAYOUTS}")
    if len(shape) not in (2, 4) or 0 in shape[1:]:
        raise DataError(f"{where}: {name} has shape {shape} ({len(shape)} dimension(s)); accepted: {INPUT_LAYOUTS}")


def _checked_x(x, name: str, where: str) -> torch.Tensor:
    """Inputs as a uint8 or float32 tensor, after the layout check and a count of NaN / inf values."""
    a = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    check_input_layout(a.shape, a.dtype, name, where)
    if a.dtype == np.uint8:
        return torch.from_numpy(a)
    with np.errstate(over="ignore"):  # values past float32's range become inf, counted and named below
        t = torch.from_numpy(a if a.dtype == np.float32 else a.astype(np.float32))
    # A finite sum proves every value finite (NaN and inf propagate) at a fraction of an elementwise test's cost;
    # only a sum that is not finite (a NaN / inf, or finite values overflowing it) pays for the full count.
    if a.dtype.kind == "f" and not math.isfinite(float(t.sum())):
        values = t.numpy().reshape(len(t), -1)
        finite = np.isfinite(values)
        if not finite.all():
            read = a.reshape(len(a), -1)  # counted as stored: float64 values past float32's range are told apart
            nan, inf = int(np.isnan(read).sum()), int(np.isinf(read).sum())
            wide = int(finite.size - finite.sum()) - nan - inf
            first = int(np.argmin(finite.all(1)))
            raise DataError(f"{where}: {name} holds {nan} NaN and {inf} inf value(s)"
                            + (f" and {wide} beyond float32's range" if wide else "")
                            + f", the first in sample {first} ({name}[{first}]); accepted: finite numbers"
                            + (" within float32's range" if wide else ""))
    return t


def _checked_y(y, name: str, where: str) -> np.ndarray:
    """Labels as a 1-d numeric array whose values are whole numbers (not yet range-checked)."""
    a = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise DataError(f"{where}: {name} has shape {tuple(a.shape)}; accepted: one integer class id per sample, "
                        "shape (N,) (one-hot labels: store their argmax)")
    if a.dtype.kind not in "biuf":
        example = f" (first value {a[0].item()!r})" if len(a) else ""
        raise DataError(f"{where}: {name} has dtype {a.dtype}{example}; accepted: integer class ids 0, 1, 2, ...")
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a) | (a != np.round(a))
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"{where}: {name}[{i}] = {_value(a[i])} is not an integer class id; accepted: integer "
                            "class ids 0, 1, 2, ... (floats only when whole numbers, e.g. 3.0)")
    return a.astype(np.int64) if a.dtype.kind == "b" else a


def check_labelled(data: LabelledData, where: str, training: bool = True) -> LabelledData:
    """`data` checked and made uniform (float32 / uint8 inputs, int64 labels, num_classes and names set); a
    DataError names the first problem, where (`where`, the array, the index) and what is accepted.

    `training` False (a key-init source: only its inputs are read) skips the non-empty test set, two-classes
    and test-coverage checks."""
    x = {s: _checked_x(getattr(data, f"x_{s}"), f"x_{s}", where) for s in SPLITS}
    y = {s: _checked_y(getattr(data, f"y_{s}"), f"y_{s}", where) for s in SPLITS}
    for s in SPLITS:
        if len(x[s]) != len(y[s]):
            raise DataError(f"{where}: x_{s} has {len(x[s])} rows but y_{s} has {len(y[s])}; accepted: one label "
                            "per input")
    if x["test"].shape[1:] != x["train"].shape[1:]:
        raise DataError(f"{where}: x_test has inputs of shape {tuple(x['test'].shape[1:])} but x_train "
                        f"{tuple(x['train'].shape[1:])}; accepted: the same input shape in both splits")
    for s in SPLITS if training else ("train",):
        if len(y[s]) == 0:
            raise DataError(f"{where}: x_{s} and y_{s} hold no samples; accepted: at least one sample per split")

    num_classes = data.num_classes
    if num_classes is None:  # inferred from the labels: bound it by the data's size
        samples = len(y["train"]) + len(y["test"])
        limit = min(MAX_CLASSES, CLASSES_PER_SAMPLE * samples)
        too_big = (f"is not a plausible class id for {samples} samples; accepted: class ids 0..{limit - 1} "
                   f"(below {CLASSES_PER_SAMPLE} x the number of samples and {MAX_CLASSES}: the largest id + 1 "
                   "is taken as the number of classes)")
    else:
        limit = num_classes
        too_big = f"is out of range; accepted: class ids 0..{num_classes - 1} (the source has {num_classes} classes)"
    for s in SPLITS:
        a, name = y[s], f"y_{s}"
        negative = a < 0
        if negative.any():
            i = int(np.argmax(negative))
            raise DataError(f"{where}: {name}[{i}] = {_value(a[i])} is negative; accepted: class ids 0, 1, 2, ...")
        over = a >= limit
        if over.any():
            i = int(np.argmax(over))
            raise DataError(f"{where}: {name}[{i}] = {_value(a[i])} {too_big}")
    labels = {s: torch.from_numpy(y[s].astype(np.int64)) for s in SPLITS}
    if num_classes is None:
        num_classes = int(max((int(v.max()) for v in labels.values() if len(v)), default=-1)) + 1
    names = data.class_names if data.class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise DataError(f"{where}: {len(names)} class names for {num_classes} classes; accepted: one name per class")

    if training:
        train_counts = torch.bincount(labels["train"], minlength=num_classes)
        present = train_counts.nonzero().flatten()
        if len(present) < 2:
            c = int(present[0])
            raise DataError(f"{where}: y_train holds a single class ({c}, {names[c]!r}); accepted: at least two "
                            "classes in the training data")
        missing = present[torch.bincount(labels["test"], minlength=num_classes)[present] == 0]
        if len(missing):
            c = int(missing[0])
            raise DataError(f"{where}: class {c} ({names[c]!r}) has {int(train_counts[c])} sample(s) in y_train but "
                            f"none in y_test ({len(missing)} trained class(es) missing from the test set); accepted: "
                            "every class in the training data also present in the test set")
    ids = check_domain_ids(data, {s: len(y[s]) for s in SPLITS}, where)
    return LabelledData(x["train"], labels["train"], x["test"], labels["test"], num_classes, list(names), *ids)


def check_domain_ids(data: LabelledData, rows: dict[str, int], where: str
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """d_train / d_test (both or neither): one non-negative integer id per sample, every test id a training
    stage's, every training stage in the test set."""
    given = {s: getattr(data, f"d_{s}") for s in SPLITS}
    if all(v is None for v in given.values()):
        return None, None
    for s in SPLITS:
        if given[s] is None:
            other = "d_test" if s == "train" else "d_train"
            raise DataError(f"{where}: {other} is given but d_{s} is not; accepted: stage ids for both splits or "
                            "neither")
    ids = {}
    for s in SPLITS:
        a = _checked_y(given[s], f"d_{s}", where)
        if len(a) != rows[s]:
            raise DataError(f"{where}: d_{s} has {len(a)} stage ids but y_{s} has {rows[s]} labels; accepted: one "
                            "stage id per sample")
        if (a < 0).any():
            i = int(np.argmax(a < 0))
            raise DataError(f"{where}: d_{s}[{i}] = {_value(a[i])} is negative; accepted: stage ids 0, 1, 2, ...")
        ids[s] = torch.from_numpy(a.astype(np.int64))
    train, test = set(ids["train"].tolist()), set(ids["test"].tolist())
    unknown = sorted(test - train)
    if unknown:
        i = int((ids["test"] == unknown[0]).nonzero()[0])
        raise DataError(f"{where}: d_test[{i}] = {unknown[0]} is a stage no training sample has; accepted: the "
                        f"stage ids of d_train ({', '.join(map(str, sorted(train)))})")
    missing = sorted(train - test)
    if missing:
        raise DataError(f"{where}: stage {missing[0]} has training samples but none in the test set "
                        f"({len(missing)} stage(s) missing from d_test); accepted: every stage in both splits")
    return ids["train"], ids["test"]


# --- toy2d: the DKVB paper's 2D problem (Figure 2) ----------------------------------------------------------

TOY2D_CENTRES = [(0.25, 0.25), (0.75, 0.25), (0.75, 0.75), (0.25, 0.75),
                 (0.75, 0.5), (0.5, 0.75), (0.25, 0.5), (0.5, 0.25)]
TOY2D_STD = 0.035
TOY2D_STAGES = [[0, 4], [1, 5], [2, 6], [3, 7]]  # the paper's stage order


def _toy2d_split(per_class: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.tensor(TOY2D_CENTRES)  # (8, 2)
    y = torch.arange(len(centres)).repeat_interleave(per_class)
    x = centres[y] + TOY2D_STD * torch.randn(len(y), 2, generator=gen)
    return x, y


@register_source("toy2d")
def load_toy2d(cfg) -> LabelledData:
    """8 Gaussian blobs (std 0.035) in the unit square; train and test drawn with fixed, distinct seeds."""
    per_train = getattr(cfg, "train_samples_per_class", 50)
    per_test = getattr(cfg, "test_samples_per_class", 200)
    x_train, y_train = _toy2d_split(per_train, torch.Generator().manual_seed(2023))
    x_test, y_test = _toy2d_split(per_test, torch.Generator().manual_seed(2024))
    return LabelledData(x_train, y_train, x_test, y_test, 8, [str(i) for i in range(8)])


def unit_square(num_samples: int, seed: int) -> torch.Tensor:
    """Uniform samples of [0, 1]^2: the unlabelled data the paper learns the toy problem's keys on."""
    return torch.rand(num_samples, 2, generator=torch.Generator().manual_seed(seed))


# --- digits: scikit-learn's 8x8 digits (ship with the package) ----------------------------------------------

def _stratified_split(n_labels: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(n_labels))
    train, test = train_test_split(idx, test_size=test_fraction, stratify=n_labels, random_state=0)
    return np.sort(train), np.sort(test)


@register_source("digits")
def load_digits(cfg) -> LabelledData:
    """1797 images of 8x8 pixels, 10 classes, as (N, 1, 8, 8) floats in [0, 1]; a fixed stratified split."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train, test = _stratified_split(bunch.target, getattr(cfg, "test_fraction", 0.3))
    return LabelledData(x[train], y[train], x[test], y[test], 10, [str(i) for i in range(10)])


@register_source("digits_32")
def load_digits_32(cfg) -> LabelledData:
    """The same digits and split, resampled (bilinear) to 32x32: big enough for the ImageNet-C corruptions
    (imagecorruptions needs 32 px), still without a download."""
    from torch.nn.functional import interpolate

    d = load_digits(cfg)
    up = lambda x: interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp_(0, 1)
    return LabelledData(up(d.x_train), d.y_train, up(d.x_test), d.y_test, d.num_classes, d.class_names)


# --- CIFAR-10 / CIFAR-100 in their python-pickle format -----------------------------------------------------

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: a data file must never run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "bytes"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only arrays are allowed in data files")


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a readable CIFAR batch file ({e})") from e


CIFAR_LAYOUT = {
    # source: (folder, train files, test files, label key, meta file, names key, torchvision class name)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels",
                "batches.meta", b"label_names", "CIFAR10"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", "meta", b"fine_label_names",
                 "CIFAR100"),
}


def _load_cifar(cfg, source: str) -> LabelledData:
    folder, train_files, test_files, label_key, meta_file, names_key, tv_name = CIFAR_LAYOUT[source]
    if cfg.root is None:
        raise DataError(f"data.root: {source} needs a root folder (holding {folder}/, or receiving it with "
                        "download: true)")
    base = Path(cfg.root).expanduser() / folder
    if not base.is_dir():
        if getattr(cfg, "download", False):
            import torchvision

            log.info("downloading %s into %s", source, cfg.root)
            try:
                getattr(torchvision.datasets, tv_name)(root=str(Path(cfg.root).expanduser()), train=True,
                                                       download=True)
            except (OSError, RuntimeError) as e:  # URLError is an OSError; torchvision raises RuntimeError
                raise DataError(f"data.download: could not download {source} into {cfg.root} ({e}); put the "
                                f"python-version archive's {folder}/ folder there, or run where the network "
                                "is reachable") from None
        else:
            raise DataError(f"data.root: {base} not found; put the python-version {source} archive's "
                            f"{folder}/ folder under {cfg.root}, or set data.download: true on a networked machine")

    def read(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for name in files:
            path = base / name
            if not path.is_file():
                raise DataError(f"data.root: {path} missing from the {source} folder")
            batch = _read_pickle(path)
            try:
                xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(batch[label_key]))  # as stored: check_labelled refuses non-integer ids
            except (KeyError, TypeError, ValueError, OverflowError) as e:
                raise DataError(f"data.root: {path}: not a {source} batch ({type(e).__name__}: {e}); accepted: a "
                                f"dict with b'data' (N x 3072 uint8) and {label_key!r} (N class ids)") from None
        return torch.from_numpy(np.concatenate(xs)), np.concatenate(ys)

    x_train, y_train = read(train_files)
    x_test, y_test = read(test_files)
    num_classes = 10 if source == "cifar10" else 100
    names = [str(i) for i in range(num_classes)]
    if (base / meta_file).is_file():
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in _read_pickle(base / meta_file)[names_key]]
    return LabelledData(x_train, y_train, x_test, y_test, num_classes, names)


@register_source("cifar10")
def load_cifar10(cfg) -> LabelledData:
    """CIFAR-10 from `root`/cifar-10-batches-py (the python-pickle release), uint8 (N, 3, 32, 32)."""
    return _load_cifar(cfg, "cifar10")


@register_source("cifar100")
def load_cifar100(cfg) -> LabelledData:
    """CIFAR-100 (fine labels) from `root`/cifar-100-python, uint8 (N, 3, 32, 32)."""
    return _load_cifar(cfg, "cifar100")


# --- image_folder: one sub-folder per class ------------------------------------------------------------------

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


DOMAIN_LAYOUT = "root/<domain>/<class>/<image>, one folder per domain, the same class folders in each"


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_classes(folder: Path, classes: list[str], size: int) -> tuple[torch.Tensor, np.ndarray]:
    """Every image of `folder`/<class>/ for the classes given (label = index in `classes`), RGB uint8."""
    from PIL import Image

    images, labels = [], []
    for label, name in enumerate(classes):
        files = _images_in(folder / name)
        if not files:
            raise DataError(f"data.root: class folder {folder / name} holds no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        for path in files:
            with Image.open(path) as img:
                img = img.convert("RGB").resize((size, size), Image.BILINEAR)
                images.append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
            labels.append(label)
    return torch.from_numpy(np.stack(images)), np.asarray(labels, dtype=np.int64)


def _split_folder(folder: Path, classes: list[str], y_np: np.ndarray, fraction: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The stratified train / test rows of one folder's images (the fixed split every image_folder uses)."""
    counts = np.bincount(y_np, minlength=len(classes))
    if len(classes) > 1 and counts.min() < 2:  # one class alone is left to check_labelled's two-classes message
        c = int(np.argmin(counts))
        raise DataError(f"data.root: class folder {folder / classes[c]} holds {counts[c]} image; accepted: at least "
                        "2 images per class (one for training, one for the test set)")
    try:
        return _stratified_split(y_np, fraction)
    except ValueError as e:  # too few images for a test set holding every class
        raise DataError(f"data.root: {folder}: {len(y_np)} images of {len(classes)} classes cannot be split with "
                        f"test_fraction {fraction} ({e}); accepted: a test set of at least one image per class "
                        "(more images, or a larger data.test_fraction)") from None


def image_folder_domains(cfg) -> list[str] | None:
    """The domain folders of an image_folder root, in stage order (`data.domains`, or sorted names); None for a
    plain root/<class>/<image> layout. A domain folder is a sub-folder holding folders rather than images."""
    root = Path(cfg.root).expanduser()
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    domain_like = [p.name for p in folders if not _images_in(p) and any(q.is_dir() for q in p.iterdir())]
    listed = getattr(cfg, "domains", None)
    if not domain_like:
        if listed is not None:
            raise DataError(f"data.domains: {root} holds class folders directly (no domain level); accepted with "
                            f"data.domains: {DOMAIN_LAYOUT}")
        return None
    class_like = [p.name for p in folders if _images_in(p)]
    loose = _images_in(root)
    if loose or class_like:
        what = (f"image file(s) ({loose[0].name}, ...)" if loose
                else f"class folder(s) with images ({class_like[0]}, ...)")
        raise DataError(f"data.root: {root} mixes domain folders ({', '.join(domain_like)}) with {what} directly in "
                        f"it; accepted: {DOMAIN_LAYOUT}, or root/<class>/<image> without domains")
    empty = [p.name for p in folders if p.name not in domain_like]
    if empty:
        raise DataError(f"data.root: domain folder {root / empty[0]} holds no images; accepted: {DOMAIN_LAYOUT}")
    if listed is None:
        return domain_like
    if len(set(listed)) != len(listed):
        twice = next(n for n in listed if listed.count(n) > 1)
        raise DataError(f"data.domains: {twice!r} is listed twice; accepted: each domain folder once")
    unknown = [n for n in listed if n not in domain_like]
    if unknown:
        raise DataError(f"data.domains: {unknown[0]!r} is not a domain folder of {root}; accepted: "
                        f"{', '.join(domain_like)}")
    if not listed:
        raise DataError(f"data.domains: an empty list; accepted: domain folders of {root} ({', '.join(domain_like)})")
    return list(listed)


@register_source("image_folder")
def load_image_folder(cfg) -> LabelledData:
    """`root`/<class>/<image>: classes sorted by folder name, images resized to image_size, RGB uint8; or
    `root`/<domain>/<class>/<image>: the same classes in every domain, each domain split on its own and its
    samples given stage id = its place in the domain order (data.stream: user)."""
    if cfg.root is None:
        raise DataError("data.root: image_folder needs a root folder with one sub-folder per class")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root: folder {root} not found")
    fraction = getattr(cfg, "test_fraction", 0.3)
    domains = image_folder_domains(cfg)
    if domains is None:
        if getattr(cfg, "stream", None) == "user":
            raise DataError(f"data.root: {root} holds class folders directly (no domain level), so its images have "
                            f"no stages; accepted with data.stream: user and image_folder: {DOMAIN_LAYOUT}")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"data.root: {root} has no class sub-folders")
        x, y_np = _read_classes(root, classes, cfg.image_size)
        train, test = _split_folder(root, classes, y_np, fraction)
        y = torch.from_numpy(y_np)
        return LabelledData(x[train], y[train], x[test], y[test], len(classes), classes)

    classes = sorted(p.name for p in (root / domains[0]).iterdir() if p.is_dir())
    for name in domains[1:]:
        other = sorted(p.name for p in (root / name).iterdir() if p.is_dir())
        if other != classes:
            lacks, extra = sorted(set(classes) - set(other)), sorted(set(other) - set(classes))
            diff = "; ".join(([f"lacks {', '.join(lacks)}"] if lacks else [])
                             + ([f"has {', '.join(extra)} besides"] if extra else []))
            raise DataError(f"data.root: domain folder {root / name} {diff} the classes of {root / domains[0]} "
                            f"({', '.join(classes)}); accepted: the same class folders in every domain")
    parts: dict[str, list] = {k: [] for k in ("x_train", "y_train", "d_train", "x_test", "y_test", "d_test")}
    for d, name in enumerate(domains):
        folder = root / name
        if not any(_images_in(folder / c) for c in classes):
            raise DataError(f"data.root: domain folder {folder} holds no images; accepted: {DOMAIN_LAYOUT}")
        x, y_np = _read_classes(folder, classes, cfg.image_size)
        rows = dict(zip(("train", "test"), _split_folder(folder, classes, y_np, fraction)))
        for s, r in rows.items():
            parts[f"x_{s}"].append(x[r])
            parts[f"y_{s}"].append(torch.from_numpy(y_np[r]))
            parts[f"d_{s}"].append(torch.full((len(r),), d, dtype=torch.int64))
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return LabelledData(cat["x_train"], cat["y_train"], cat["x_test"], cat["y_test"], len(classes), classes,
                        cat["d_train"], cat["d_test"])


# --- npz: a user's own arrays ----------------------------------------------------------------------------------

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_STAGE_KEYS = ("d_train", "d_test")  # optional: one stage id per sample (data.stream: user)


@register_source("npz")
def load_npz(cfg) -> LabelledData:
    """A .npz file with x_train, y_train, x_test, y_test (and optionally d_train, d_test: stage ids); x as vectors
    (N, D) or images (N, C, H, W)."""
    if cfg.root is None:
        raise DataError("data.root: npz needs the path of a .npz file with arrays " + ", ".join(NPZ_KEYS))
    path = Path(cfg.root).expanduser()
    if not path.is_file():
        raise DataError(f"data.root: file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise DataError(f"data.root: {path} lacks array(s) {', '.join(missing)}; "
                                f"needed: {', '.join(NPZ_KEYS)}")
            arrays = {k: f[k] for k in NPZ_KEYS + NPZ_STAGE_KEYS if k in f.files}
    except (OSError, ValueError) as e:
        raise DataError(f"data.root: {path} is not a readable .npz file ({e})") from e

    # Left as read: check_labelled refuses what is wrong (0.7 as a label, NaN, ...) before any cast could hide it,
    # and infers the number of classes from the labels.
    return LabelledData(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], None, None,
                        arrays.get("d_train"), arrays.get("d_test"))


def source_shape(cfg) -> tuple[int, ...]:
    """The shape of one input (no batch dimension), known without reading the data where the source fixes it."""
    fixed = {"toy2d": (2,), "unit_square": (2,), "digits": (1, 8, 8), "digits_32": (1, 32, 32),
             "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}
    if cfg.source in fixed:
        return fixed[cfg.source]
    if cfg.source == "image_folder":
        return (3, cfg.image_size, cfg.image_size)
    if cfg.root is None:  # npz
        raise DataError("data.root: npz needs the path of a .npz file with arrays " + ", ".join(NPZ_KEYS))
    path = Path(cfg.root).expanduser()
    if not path.is_file():
        raise DataError(f"data.root: file {path} not found")
    import zipfile

    try:  # read only the array header, not the data
        with zipfile.ZipFile(path) as archive, archive.open("x_train.npy") as f:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = reader(f)
    except (KeyError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise DataError(f"data.root: {path} is not an .npz file with an x_train array ({e})") from e
    check_input_layout(shape, dtype, "x_train", _where(cfg))  # before a backbone is built for that shape
    return tuple(shape[1:])


# Options that change what a source yields; everything else (stages, seeds of training) does not.
IDENTITY_FIELDS = {
    "toy2d": ("train_samples_per_class", "test_samples_per_class"),
    "digits": ("test_fraction",),
    "digits_32": ("test_fraction",),
    "cifar10": (), "cifar100": (),
    "image_folder": ("image_size", "test_fraction"),
    "npz": (),
    "unit_square": ("num_samples",),
}


def _fingerprint(path: Path) -> dict:
    """Size and modification time of a file, or of every file under a folder: changed data, new cache key."""
    if path.is_file():
        st = path.stat()
        return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    stats = [p.stat() for p in files]
    return {"files": len(files), "bytes": sum(s.st_size for s in stats),
            "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


def source_identity(cfg) -> dict:
    """What identifies a source's content, for cache keys: its name, its options, and its files' fingerprint."""
    ident = {"source": cfg.source}
    for name in IDENTITY_FIELDS.get(cfg.source, ()):
        ident[name] = getattr(cfg, name, None)
    if cfg.source == "image_folder" and getattr(cfg, "domains", None) is not None:  # the order and choice of domains
        ident["domains"] = list(cfg.domains)
    if cfg.source in ("cifar10", "cifar100", "image_folder", "npz") and cfg.root is not None:
        root = Path(cfg.root).expanduser().resolve()
        if cfg.source in CIFAR_LAYOUT:
            root = root / CIFAR_LAYOUT[cfg.source][0]
        ident["root"] = str(root)
        ident["fingerprint"] = _fingerprint(root)
    return ident
