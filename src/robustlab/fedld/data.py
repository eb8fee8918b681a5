"""Data for FedLD experiments: MedMNIST ``.npz`` files, the SSL-FL folder format, scikit-learn's digits,
Dirichlet label-skew partitions (flwr-datasets' ``DirichletPartitioner`` on in-memory data), natural
splits, and per-client label histograms.

Every loader returns an :class:`ImageDataset`: uint8 images, channels-last ``(N, H, W, C)``, and int64
labels ``(N,)`` (``(N, L)`` for multi-label sets such as ChestMNIST), split into train / val / test.
:meth:`ImageSplit.tensors` turns a split into normalised float32 ``(N, C, H, W)`` torch tensors.

User mistakes (missing or corrupt file, missing keys, image/label count mismatch, bad partition
settings) raise :class:`robustlab.errors.UserError` with the file and the fix.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robustlab.errors import UserError

# --------------------------------------------------------------------------------------------------
# containers


@dataclass
class ImageSplit:
    """One split: ``images`` uint8 ``(N, H, W, C)``, ``labels`` int64 ``(N,)`` or ``(N, L)`` (multi-label)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSplit:
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSplit(self.images[idx], self.labels[idx])

    def channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std of the images scaled to [0, 1] (use the train split's for all splits)."""
        x = self.images.astype(np.float64) / 255.0
        mean = x.mean(axis=(0, 1, 2))
        std = x.std(axis=(0, 1, 2))
        return mean, np.where(std > 0, std, 1.0)

    def tensors(
        self,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels: int | None = None,
    ) -> tuple[Any, Any]:
        """``(x, y)`` torch tensors: x float32 ``(N, C, H, W)`` = (image/255 − mean)/std, y int64
        (float32 for multi-label targets). ``mean``/``std`` default to this split's own statistics;
        ``channels=3`` repeats a grey image to 3 channels first."""
        import torch

        images = self.images
        if channels is not None and images.shape[-1] != channels:
            if images.shape[-1] != 1:
                raise UserError(f"cannot turn {images.shape[-1]}-channel images into {channels} channels")
            images = np.repeat(images, channels, axis=-1)
        if mean is None or std is None:
            mean, std = self.channel_stats()
        m = np.asarray(mean, dtype=np.float32).reshape(1, 1, 1, -1)
        s = np.asarray(std, dtype=np.float32).reshape(1, 1, 1, -1)
        x = (images.astype(np.float32) / 255.0 - m) / s
        x_t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        y_t = torch.from_numpy(self.labels.astype(np.float32 if self.labels.ndim == 2 else np.int64))
        return x_t, y_t


@dataclass
class ImageDataset:
    """A dataset with train / val / test splits and what a model and metric need to know about it.

    ``task`` is MedMNIST's vocabulary: ``multi-class``, ``binary-class``, ``ordinal-regression`` (treated
    as multi-class) or ``multi-label``. ``natural_partitions`` holds per-client train indices when the
    source defines clients (SSL-FL splits); ``val`` is ``None`` when the source has no validation split
    (see :func:`holdout_validation`).
    """

    name: str
    task: str
    num_classes: int
    train: ImageSplit
    val: ImageSplit | None
    test: ImageSplit
    source: str = ""
    class_names: list[str] = field(default_factory=list)
    natural_partitions: list[np.ndarray] | None = None

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[-1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def multi_label(self) -> bool:
        return self.task == "multi-label"


# --------------------------------------------------------------------------------------------------
# MedMNIST

# flag -> (task, channels, classes); MedMNIST v2/v3 2D datasets (medmnist 3.0.2 ``INFO``)
MEDMNIST_FLAGS: dict[str, tuple[str, int, int]] = {
    "pathmnist": ("multi-class", 3, 9),
    "chestmnist": ("multi-label", 1, 14),
    "dermamnist": ("multi-class", 3, 7),
    "octmnist": ("multi-class", 1, 4),
    "pneumoniamnist": ("binary-class", 1, 2),
    "retinamnist": ("ordinal-regression", 3, 5),
    "breastmnist": ("binary-class", 1, 2),
    "bloodmnist": ("multi-class", 3, 8),
    "tissuemnist": ("multi-class", 1, 8),
    "organamnist": ("multi-class", 1, 11),
    "organcmnist": ("multi-class", 1, 11),
    "organsmnist": ("multi-class", 1, 11),
}
MEDMNIST_SIZES = (28, 64, 128, 224)
MEDMNIST_KEYS = ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels")
_CLASS_NAMES = {
    "retinamnist": ["grade 0", "grade 1", "grade 2", "grade 3", "grade 4"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "octmnist": ["CNV", "DME", "drusen", "normal"],
}


def default_medmnist_dir() -> Path:
    """``~/.medmnist``, the ``medmnist`` package's default root."""
    return Path(os.path.expanduser("~")) / ".medmnist"


def _base_flag(flag: str) -> str:
    base = flag.lower()
    for suffix in ("_balanced",):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base


def medmnist_candidates(flag: str, size: int = 28) -> list[str]:
    """File names accepted for ``flag`` at ``size``: ``{flag}.npz`` (28 px) or ``{flag}_{size}.npz``, and
    the class-balanced variants ``{flag}_balanced.npz`` / ``{flag}_{size}_balanced.npz`` (e.g. the staged
    ``pneumoniamnist_balanced.npz``). A flag that already ends in ``_balanced`` names that file only."""
    flag = flag.lower()
    stem = flag if size == 28 else f"{flag}_{size}"
    if flag.endswith("_balanced"):
        base = _base_flag(flag)
        return [f"{base}_balanced.npz" if size == 28 else f"{base}_{size}_balanced.npz"]
    return [f"{stem}.npz", f"{stem}_balanced.npz"]


def _try_download(flag: str, size: int, data_dir: Path) -> Path | None:
    """Download through the ``medmnist`` package when it is installed; ``None`` when it is not."""
    if importlib.util.find_spec("medmnist") is None:
        return None
    import medmnist  # type: ignore[import-not-found]

    info = medmnist.INFO.get(flag)
    if info is None:
        return None
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        cls = getattr(medmnist, info["python_class"])
        cls(split="train", download=True, root=str(data_dir), size=size)
    except Exception as exc:  # network down, server error: say so in one line
        raise UserError(
            f"could not download MedMNIST '{flag}' ({size} px) into {data_dir}: {type(exc).__name__}: {exc}",
            f"download {medmnist_candidates(flag, size)[0]} from https://zenodo.org/records/10519652 "
            f"and put it in {data_dir} (or pass --data-dir)",
        ) from None
    path = data_dir / medmnist_candidates(flag, size)[0]
    return path if path.is_file() else None


def resolve_medmnist_file(flag: str, size: int = 28, data_dir: str | Path | None = None,
                          download: bool = True) -> Path:  # fmt: skip
    """Find the ``.npz`` for ``flag``/``size`` in ``data_dir`` (default ``~/.medmnist``).

    ``flag`` may also be a path to an ``.npz`` file. When no candidate file exists and ``download`` is
    true, the ``medmnist`` package downloads it if installed (and online); otherwise a ``UserError`` names
    the file and where to put it.
    """
    if size not in MEDMNIST_SIZES:
        raise UserError(f"MedMNIST size must be one of {MEDMNIST_SIZES}, got {size}", "use --size 28")
    as_path = Path(os.path.expanduser(str(flag)))
    if str(flag).endswith(".npz"):
        if as_path.is_file():
            return as_path
        if data_dir is not None and (Path(data_dir) / as_path.name).is_file():
            return Path(data_dir) / as_path.name
        raise UserError(f"MedMNIST file {as_path} does not exist", "check the path or pass --data-dir")
    directory = Path(os.path.expanduser(str(data_dir))) if data_dir is not None else default_medmnist_dir()
    candidates = medmnist_candidates(flag, size)
    for name in candidates:
        if (directory / name).is_file():
            return directory / name
    base = _base_flag(flag)
    if base not in MEDMNIST_FLAGS:
        raise UserError(
            f"unknown MedMNIST dataset '{flag}' and no file {candidates[0]} in {directory}",
            f"use one of {', '.join(sorted(MEDMNIST_FLAGS))}, or put your own {candidates[0]} in the data dir",
        )
    if download and not flag.lower().endswith("_balanced"):
        got = _try_download(base, size, directory)
        if got is not None:
            return got
    raise UserError(
        f"MedMNIST file {candidates[0]} not found in {directory}",
        f"download it from https://zenodo.org/records/10519652/files/{candidates[0]} (or `pip install "
        f"medmnist` while online) and put it in {directory}, or pass --data-dir to the folder holding it",
    )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in MEDMNIST_KEYS if k not in z.files]
            if missing:
                raise UserError(
                    f"{path} is not a MedMNIST file: keys {missing} are missing (it has {sorted(z.files)})",
                    "use an .npz with train/val/test _images and _labels arrays",
                )
            return {k: np.asarray(z[k]) for k in MEDMNIST_KEYS}
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise UserError(
            f"{path} is corrupt or not an .npz file ({type(exc).__name__}: {exc})",
            "download the file again (https://zenodo.org/records/10519652)",
        ) from None


def _to_split(images: np.ndarray, labels: np.ndarray, name: str, path: Path, multi_label: bool) -> ImageSplit:
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] not in (1, 3):
        raise UserError(
            f"{path}: {name}_images has shape {images.shape}, expected (N, S, S) or (N, S, S, 3)",
            "use MedMNIST-format images (square, grey or RGB, channels last)",
        )
    labels = np.asarray(labels)
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2:
        raise UserError(f"{path}: {name}_labels has shape {labels.shape}", "labels must be (N,) or (N, L)")
    if images.shape[0] != labels.shape[0]:
        raise UserError(
            f"{path}: {name} has {images.shape[0]} images but {labels.shape[0]} labels",
            "the file is inconsistent; download it again",
        )
    if images.dtype != np.uint8:
        if np.issubdtype(images.dtype, np.floating) and images.size and float(np.nanmax(images)) <= 1.0:
            images = images * 255.0
        images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    if not multi_label and labels.shape[1] != 1:
        raise UserError(
            f"{path}: {name}_labels has {labels.shape[1]} columns", "single-label data needs (N, 1)"
        )
    labels = labels.astype(np.int64)
    return ImageSplit(images, labels if multi_label else labels[:, 0])


def load_medmnist(flag: str = "retinamnist", size: int = 28, data_dir: str | Path | None = None,
                  download: bool = True) -> ImageDataset:  # fmt: skip
    """Load a MedMNIST ``.npz`` (any 2D flag and size; see :func:`resolve_medmnist_file`).

    Keys ``{train,val,test}_{images,labels}``; images uint8 ``(N, S, S)`` or ``(N, S, S, 3)``; labels
    ``(N, 1)`` or ``(N, 14)`` for ChestMNIST. Raises ``UserError`` for a missing or corrupt file, missing
    keys, or an image/label count mismatch.
    """
    path = resolve_medmnist_file(flag, size, data_dir, download)
    raw = _read_npz(path)
    base = _base_flag(str(flag)) if not str(flag).endswith(".npz") else _base_flag(Path(flag).stem)
    task, _, n_classes = MEDMNIST_FLAGS.get(base, ("", 0, 0))
    multi_label = task == "multi-label" or (
        not task and raw["train_labels"].ndim == 2 and raw["train_labels"].shape[1] > 1
    )
    splits = {
        s: _to_split(raw[f"{s}_images"], raw[f"{s}_labels"], s, path, multi_label)
        for s in ("train", "val", "test")
    }
    if not task:
        task = "multi-label" if multi_label else "multi-class"
        n_classes = (
            splits["train"].labels.shape[1]
            if multi_label
            else int(max(int(splits[s].labels.max(initial=0)) for s in splits) + 1)
        )
    if not multi_label:
        top = max(int(splits[s].labels.max(initial=0)) for s in splits)
        lo = min(int(splits[s].labels.min(initial=0)) for s in splits)
        if lo < 0 or top >= n_classes:
            raise UserError(f"{path}: labels range over [{lo}, {top}] but {base} has {n_classes} classes",
                            "check that the file matches the dataset name")  # fmt: skip
    sizes = {splits[s].images.shape[1] for s in splits}
    if len(sizes) != 1:
        raise UserError(f"{path}: splits have different image sizes {sorted(sizes)}", "use one image size")
    if not str(flag).endswith(".npz") and sizes != {size}:
        raise UserError(f"{path} holds {sizes.pop()} px images but size {size} was asked for",
                        "pass the matching --size or the right file")  # fmt: skip
    return ImageDataset(
        name=Path(path).stem, task=task, num_classes=n_classes, train=splits["train"], val=splits["val"],
        test=splits["test"], source=str(path), class_names=list(_CLASS_NAMES.get(base, [])),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# scikit-learn digits (zero-download fallback)


def load_digits_dataset(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> ImageDataset:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes) as a zero-download fallback, split
    stratified into train / val / test with ``seed``. Pixel values 0..16 are scaled to 0..255."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction), stratify=labels[rest],
                                  random_state=seed)  # fmt: skip
    split = ImageSplit(images, labels)
    return ImageDataset(
        name="digits", task="multi-class", num_classes=10, train=split.subset(train), val=split.subset(val),
        test=split.subset(test), source="sklearn.datasets.load_digits", class_names=[str(i) for i in range(10)],
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# SSL-FL folder format (the paper's Retina and COVID-FL data)


def _read_names(path: Path) -> list[str]:
    """First column of a csv, one file name per line; a header line is skipped; order kept, duplicates dropped."""
    names: list[str] = []
    seen: set[str] = set()
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row or not row[0].strip():
                continue
            name = row[0].strip()
            if name in seen:
                continue
            seen.add(name)
            names.append(name)
    return names


def _read_labels(path: Path) -> dict[str, int]:
    labels: dict[str, int] = {}
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if len(row) < 2 or not row[0].strip():
                continue
            try:
                labels[row[0].strip()] = int(float(row[1]))
            except ValueError:
                if lineno == 1:
                    continue  # header
                raise UserError(f"{path}:{lineno}: label '{row[1]}' is not a number", "fix the csv") from None
    return labels


def _load_image(path: Path, size: int | None) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read image {path}: {exc}", "replace the corrupt file") from None
    else:
        from PIL import Image

        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except OSError as exc:
            raise UserError(f"cannot read image {path}: {exc}", "replace the corrupt file") from None
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    elif arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim != 3:
        raise UserError(f"image {path} has shape {arr.shape}", "images must be (H, W) or (H, W, C)")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
    if size is not None and (arr.shape[0] != size or arr.shape[1] != size):
        from PIL import Image

        arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR))
    return arr


def load_sslfl(root: str | Path, split: str = "split_1", num_clients: int | None = None,
               image_size: int | None = 28) -> ImageDataset:  # fmt: skip
    """The SSL-FL folder format (Yan et al., TMI 2023) used by the FedLD paper for Retina and COVID-FL::

        root/labels.csv                        file name, label   (all images)
        root/train/<name>                      .npy (or .png/.jpg) training images
        root/test/<name>,  root/test.csv       test images and their names
        root/<n>_clients/<split>/client_*.csv  one file name per line per client (split_1..3, split_real)

    The clients' files define the train set and its **natural partition** (``natural_partitions``, in
    client-file order). Images are resized to ``image_size`` (``None`` keeps them; they must then share a
    size) and stored as uint8 RGB. There is no validation split (``val=None``).
    """
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise UserError(f"SSL-FL data folder {root} does not exist", "pass the folder holding labels.csv")
    for needed in ("labels.csv", "test.csv"):
        if not (root / needed).is_file():
            raise UserError(f"{root} has no {needed}", "this is not an SSL-FL dataset folder")
    if num_clients is None:
        folders = sorted(p for p in root.glob("*_clients") if (p / split).is_dir())
        if not folders:
            raise UserError(
                f"no <n>_clients/{split} folder in {root}", "pass --split (e.g. split_1 or split_real)"
            )
        split_dir = folders[0] / split
    else:
        split_dir = root / f"{num_clients}_clients" / split
    client_files = sorted(split_dir.glob("*.csv"), key=lambda p: (len(p.stem), p.stem))
    if not client_files:
        raise UserError(f"{split_dir} holds no client csv files", "check the split name")
    labels = _read_labels(root / "labels.csv")

    def build(names: list[str], folder: str) -> ImageSplit:
        missing = [n for n in names if n not in labels]
        if missing:
            raise UserError(f"{len(missing)} images have no label in labels.csv (e.g. {missing[0]})",
                            "labels.csv must list every image")  # fmt: skip
        imgs = []
        for n in names:
            p = root / folder / n
            if not p.is_file():
                raise UserError(
                    f"image {p} is listed but missing", "restore the file or remove it from the csv"
                )
            imgs.append(_load_image(p, image_size))
        shapes = {im.shape for im in imgs}
        if len(shapes) > 1:
            raise UserError(
                f"images in {root / folder} differ in size {sorted(shapes)[:3]}", "pass image_size"
            )
        images = np.stack(imgs) if imgs else np.zeros((0, 1, 1, 3), np.uint8)
        return ImageSplit(images, np.array([labels[n] for n in names], dtype=np.int64))

    per_client = [_read_names(p) for p in client_files]
    names = [n for c in per_client for n in c]
    if len(set(names)) != len(names):
        raise UserError(f"clients in {split_dir} share images", "each image must belong to one client")
    train = build(names, "train")
    test = build(_read_names(root / "test.csv"), "test")
    bounds = np.cumsum([0] + [len(c) for c in per_client])
    parts = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(per_client))]
    n_classes = int(max(train.labels.max(initial=0), test.labels.max(initial=0)) + 1)
    return ImageDataset(
        name=f"{root.name}-{split}", task="binary-class" if n_classes == 2 else "multi-class",
        num_classes=n_classes, train=train, val=None, test=test, source=str(root), natural_partitions=parts,
    )  # fmt: skip


def holdout_validation(dataset: ImageDataset, fraction: float = 0.1, seed: int = 0) -> ImageDataset:
    """Carve a stratified validation split out of train (for sources without one, e.g. SSL-FL).
    Natural partitions are re-indexed onto the remaining train set."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"validation fraction must be in (0, 1), got {fraction}", "use e.g. 0.1")
    from sklearn.model_selection import train_test_split

    n = len(dataset.train)
    idx = np.arange(n)
    y = dataset.train.labels if dataset.train.labels.ndim == 1 else None
    try:
        keep, val = train_test_split(idx, test_size=fraction, stratify=y, random_state=seed)
    except ValueError:
        keep, val = train_test_split(idx, test_size=fraction, random_state=seed)
    keep = np.sort(keep)
    parts = None
    if dataset.natural_partitions is not None:
        new_index = -np.ones(n, dtype=np.int64)
        new_index[keep] = np.arange(len(keep))
        parts = [new_index[p][new_index[p] >= 0] for p in dataset.natural_partitions]
    return ImageDataset(
        name=dataset.name, task=dataset.task, num_classes=dataset.num_classes, train=dataset.train.subset(keep),
        val=dataset.train.subset(np.sort(val)), test=dataset.test, source=dataset.source,
        class_names=dataset.class_names, natural_partitions=parts,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# partitions


def _check_labels_1d(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise UserError(
            f"label-skew partitions need one label per sample, got labels of shape {labels.shape}",
            "use a single-label dataset (multi-label data such as ChestMNIST cannot be Dirichlet-split by label)",
        )
    return labels


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    beta: float,
    *,
    min_partition_size: int = 10,
    seed: int = 0,
    self_balancing: bool = True,
) -> list[np.ndarray]:
    """Dirichlet label-skew split (β = concentration; 100 ≈ IID, 1 moderate, 0.5 severe), through
    flwr-datasets' ``DirichletPartitioner`` on an in-memory ``datasets.Dataset``.

    Per class, client shares are drawn from Dir(β); with ``self_balancing`` (the SSL-FL/NIID-Bench recipe
    the paper's splits use) a client already above N/num_clients samples gets no more. The draw is repeated
    (up to flwr-datasets' limit of 10 retries) until every client has ``min_partition_size`` samples. The
    same ``seed`` gives the same partition. Returns the sorted train indices of each client.

    Raises ``UserError`` for β <= 0, fewer than 1 client, more clients than samples, a minimum size that
    cannot be met, or multi-label data.
    """
    labels = _check_labels_1d(labels)
    n = int(labels.shape[0])
    try:
        beta = float(beta)
    except (TypeError, ValueError):
        raise UserError(f"beta must be a positive number, got {beta!r}", "use e.g. 0.5, 1 or 100") from None
    if not (np.isfinite(beta) and beta > 0):
        raise UserError(
            f"Dirichlet beta must be > 0, got {beta}", "use e.g. 100 (near IID), 1 or 0.5 (severe skew)"
        )
    if int(num_clients) < 1:
        raise UserError(f"num_clients must be >= 1, got {num_clients}", "use e.g. 5")
    num_clients = int(num_clients)
    if num_clients > n:
        raise UserError(f"{num_clients} clients but only {n} training samples", "use fewer clients")
    if min_partition_size < 0 or num_clients * int(min_partition_size) > n:
        raise UserError(
            f"{num_clients} clients x min partition size {min_partition_size} exceeds the {n} samples",
            "lower --min-partition-size or use fewer clients",
        )
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    ds = datasets.Dataset.from_dict({"label": labels.astype(np.int64), "index": np.arange(n, dtype=np.int64)})
    partitioner = DirichletPartitioner(
        num_partitions=num_clients, partition_by="label", alpha=beta, min_partition_size=int(min_partition_size),
        self_balancing=self_balancing, shuffle=True, seed=int(seed),
    )  # fmt: skip
    partitioner.dataset = ds
    try:
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore")
            parts = [np.sort(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64))
                     for i in range(num_clients)]  # fmt: skip
    except ValueError as exc:
        raise UserError(
            f"could not draw a Dirichlet(beta={beta}) split of {n} samples into {num_clients} clients with at "
            f"least {min_partition_size} samples each ({exc})",
            "lower the minimum partition size, use fewer clients, or a larger beta",
        ) from None
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if flat.size != n or not np.array_equal(np.sort(flat), np.arange(n)):
        # flwr-datasets divides by zero when every eligible client drew a zero share (tiny beta)
        raise UserError(
            f"the Dirichlet(beta={beta}) split came out invalid (numerical underflow at this beta)",
            "use a larger beta (e.g. >= 0.05)",
        )
    return parts


def natural_partition(client_ids: Sequence[Any] | np.ndarray) -> list[np.ndarray]:
    """A natural split: one client per distinct id (sorted), holding the indices with that id."""
    ids = np.asarray(client_ids)
    if ids.ndim != 1 or ids.size == 0:
        raise UserError("natural_partition needs one client id per sample", "pass a 1-D array of ids")
    return [np.flatnonzero(ids == u) for u in np.unique(ids)]


def iid_partition(num_samples: int, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Uniformly random split into near-equal parts (sizes differ by at most 1)."""
    if not 1 <= num_clients <= num_samples:
        raise UserError(f"cannot split {num_samples} samples into {num_clients} clients", "use fewer clients")
    perm = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


# --------------------------------------------------------------------------------------------------
# label histograms


def label_histogram(
    labels: np.ndarray, partitions: Sequence[np.ndarray], num_classes: int | None = None
) -> np.ndarray:
    """Counts matrix ``(num_clients, num_classes)``: entry (i, c) = samples of class c on client i.
    For multi-label data, counts the positives of each label."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim == 2:
        return np.stack([labels[np.asarray(p, dtype=np.int64)].sum(axis=0) for p in partitions]).astype(
            np.int64
        )
    if num_classes is None:
        num_classes = int(labels.max(initial=-1)) + 1
    return np.stack(
        [
            np.bincount(labels[np.asarray(p, dtype=np.int64)], minlength=num_classes)[:num_classes]
            for p in partitions
        ]
    ).astype(np.int64)


def label_skew(counts: np.ndarray) -> float:
    """Sample-weighted mean total-variation distance between each client's label distribution and the
    pooled one: 0 for identical label mixes, approaching 1 when clients hold disjoint classes."""
    counts = np.asarray(counts, dtype=np.float64)
    sizes = counts.sum(axis=1)
    total = counts.sum(axis=0)
    if sizes.sum() <= 0:
        return 0.0
    pooled = total / total.sum()
    local = counts / np.where(sizes > 0, sizes, 1.0)[:, None]
    tv = 0.5 * np.abs(local - pooled[None, :]).sum(axis=1)
    return float((sizes * tv).sum() / sizes.sum())


def plot_label_histogram(counts: np.ndarray, path: str | Path, class_names: Sequence[str] | None = None,
                         title: str = "Label distribution per client") -> Path:  # fmt: skip
    """Stacked horizontal bars, one per client, one colour per class; saved as PNG at ``path``."""
    from robustlab.report import pyplot, save_figure

    counts = np.asarray(counts)
    n_clients, n_classes = counts.shape
    names = list(class_names) if class_names else [str(c) for c in range(n_classes)]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * n_clients + 1.4))
    left = np.zeros(n_clients)
    cmap = plt.get_cmap("tab10" if n_classes <= 10 else "tab20")
    for c in range(n_classes):
        ax.barh(np.arange(n_clients), counts[:, c], left=left, color=cmap(c % cmap.N), label=names[c])
        left += counts[:, c]
    ax.set_yticks(np.arange(n_clients), [f"client {i}" for i in range(n_clients)])
    ax.invert_yaxis()
    ax.set_xlabel("samples")
    ax.set_title(f"{title} (skew {label_skew(counts):.2f})")
    ax.legend(title="class", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8)
    return save_figure(fig, path)
