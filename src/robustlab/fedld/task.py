"""The learning task a federation trains: data splits, the clients' partitions, the model and metrics.

A :class:`TaskSpec` is small and hashable (it travels in every round's ``ConfigRecord``); :func:`load_task`
turns it into a :class:`Task` once per process (cached), so every ClientApp invocation and the ServerApp
see the same arrays, the same partitions and the same model architecture. Loading, partitioning and the
model come from :mod:`robustlab.fedld.data` and :mod:`robustlab.fedld.models`; this module only wires
them together and adds the evaluation metrics and the clients' local test sets.

Clients' local test sets: the test split is divided among the clients class by class in proportion to
each client's share of that class in the training partition (largest remainders, seeded), so every client
is evaluated on its own label distribution; for a model shared by all clients the sample-weighted mean of
the clients' accuracies equals the accuracy on the whole test split.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from robustlab.errors import UserError


@dataclass(frozen=True)
class TaskSpec:
    """What to train on: dataset (a MedMNIST flag or ``digits``), where its file is, how it is split."""

    dataset: str = "retinamnist"
    data_dir: str | None = None
    num_partitions: int = 5
    beta: float = 0.5
    seed: int = 0
    min_partition_size: int = 10
    model: str = "cnn"
    #: copy ImageNet weights into the backbone (from ``weights``, else the installed package)
    pretrained: bool = False
    #: side of the images the model sees (0 = the dataset's own); a MedMNIST file at that size is used
    #: when the folder has one, else the images are resized (bilinear)
    image_size: int = 0
    #: a local ImageNet ``state_dict`` file for the backbone ("" = the installed package's)
    weights: str = ""
    #: SSL-FL split folder (``dataset="sslfl"``): split_1..3 (Retina's Dirichlet splits), split_real
    sslfl_split: str = "split_1"

    def to_config(self) -> dict[str, Any]:
        """The spec as ConfigRecord entries (``task-*`` keys)."""
        d = asdict(self)
        d["data_dir"] = d["data_dir"] or ""
        return {f"task-{k.replace('_', '-')}": v for k, v in d.items()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], node_config: Mapping[str, Any] | None = None) -> TaskSpec:
        """Rebuild the spec from a ConfigRecord; a node's ``data-dir`` / ``num-partitions`` take precedence
        (a real SuperNode knows where its data is)."""
        node_config = node_config or {}
        d = cls()  # a key the config lacks keeps the spec's default
        get = lambda k, default: config.get(f"task-{k}", default)  # noqa: E731
        data_dir = str(node_config.get("data-dir", "") or get("data-dir", "")) or None
        num = int(node_config.get("num-partitions", get("num-partitions", d.num_partitions)))
        return cls(
            dataset=str(get("dataset", d.dataset)),
            data_dir=data_dir,
            num_partitions=num,
            beta=float(get("beta", d.beta)),
            seed=int(get("seed", d.seed)),
            min_partition_size=int(get("min-partition-size", d.min_partition_size)),
            model=str(get("model", d.model)),
            pretrained=bool(get("pretrained", d.pretrained)),
            image_size=int(get("image-size", d.image_size)),
            weights=str(get("weights", d.weights)),
            sslfl_split=str(get("sslfl-split", d.sslfl_split)),
        )


@dataclass
class Task:
    spec: TaskSpec
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    in_channels: int
    image_size: int
    partitions: list[np.ndarray]
    test_partitions: list[np.ndarray]
    #: the validation split divided like the test split: personalised methods (FedBN, FedPAC) choose their
    #: reported round on the clients' own models' validation accuracy
    val_partitions: list[np.ndarray]
    #: the file the images came from and their size there (before any resizing)
    source: str = ""
    source_image_size: int = 0

    # -- model
    def build_model(self) -> torch.nn.Module:
        from robustlab.fedld import models

        return models.build_model(
            self.spec.model,
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            image_size=self.image_size,
            pretrained=self.spec.pretrained,
            weights=self.spec.weights or None,
        )

    def batchnorm_keys(self) -> list[str]:
        """State entries of the model's BatchNorm layers (weights, biases, running statistics)."""
        from robustlab.fedld import models

        return models.batchnorm_keys(self.build_model())

    def head_keys(self) -> list[str]:
        """State entries of the model's classifier head (what FedPAC personalises)."""
        from robustlab.fedld import models

        return models.head_keys(self.build_model())

    def features_and_logits(
        self, model: torch.nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(representation, logits): ``model.features`` and ``model.head`` when the model has them (the
        models of :mod:`robustlab.fedld.models`), else the input of its last ``Linear`` layer."""
        if hasattr(model, "features") and hasattr(model, "head"):
            z = model.features(x)  # type: ignore[operator]
            return z, model.head(z)  # type: ignore[operator]
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        store: dict[str, torch.Tensor] = {}
        handle = last.register_forward_hook(lambda _m, inp, _out: store.__setitem__("z", inp[0]))
        try:
            logits = model(x)
        finally:
            handle.remove()
        return store["z"], logits

    # -- metrics
    @torch.no_grad()
    def evaluate(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        full: bool = False,
        per_class: bool = False,
    ) -> dict[str, Any]:
        """Accuracy and mean cross-entropy; with ``full`` also balanced accuracy and macro AUC (one-vs-rest
        for several classes, the positive class's score for two; ``nan`` when a class is missing); with
        ``per_class`` the correct and total counts per class."""
        model.eval()
        logits = (
            torch.cat([model(x[i : i + 512]) for i in range(0, len(x), 512)])
            if len(x)
            else torch.zeros(0, self.num_classes)
        )
        n = len(y)
        out: dict[str, Any] = {
            "accuracy": float((logits.argmax(1) == y).float().mean()) if n else float("nan"),
            "loss": float(torch.nn.functional.cross_entropy(logits, y)) if n else float("nan"),
        }
        if full:
            out.update(classification_metrics(y.numpy(), torch.softmax(logits, 1).numpy(), self.num_classes))
        if per_class:  # exact counts, so that the server can pool the clients' shares
            hit = logits.argmax(1) == y
            out["class_correct"] = torch.bincount(y[hit], minlength=self.num_classes).tolist()
            out["class_count"] = torch.bincount(y, minlength=self.num_classes).tolist()
        return out


def classification_metrics(y: np.ndarray, probs: np.ndarray, num_classes: int) -> dict[str, float]:
    """Balanced accuracy and macro AUC (scikit-learn) from labels and class probabilities."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    pred = probs.argmax(1)
    out = {"balanced_accuracy": float(balanced_accuracy_score(y, pred)) if len(y) else float("nan")}
    present = np.unique(y)
    try:
        if num_classes == 2:
            out["auc"] = float(roc_auc_score(y, probs[:, 1])) if len(present) == 2 else float("nan")
        elif len(present) == num_classes:
            out["auc"] = float(
                roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(num_classes)))
            )
        else:
            out["auc"] = float("nan")
    except ValueError:
        out["auc"] = float("nan")
    return out


def split_test_like_train(
    train_labels: np.ndarray,
    partitions: list[np.ndarray],
    test_labels: np.ndarray,
    num_classes: int,
    seed: int,
) -> list[np.ndarray]:
    """Divide the test indices among clients class by class, in proportion to each client's share of that
    class in training (largest remainders; a class no client trained on goes to nobody)."""
    rng = np.random.default_rng(seed)
    m = len(partitions)
    counts = np.zeros((m, num_classes), dtype=np.int64)
    for i, idx in enumerate(partitions):
        counts[i] = np.bincount(train_labels[idx], minlength=num_classes)
    out: list[list[int]] = [[] for _ in range(m)]
    for c in range(num_classes):
        idx = np.flatnonzero(test_labels == c)
        total = counts[:, c].sum()
        if total == 0 or len(idx) == 0:
            continue
        idx = rng.permutation(idx)
        share = counts[:, c] / total * len(idx)
        take = np.floor(share).astype(np.int64)
        rest = len(idx) - take.sum()
        order = np.argsort(-(share - take), kind="stable")
        take[order[:rest]] += 1
        start = 0
        for i in range(m):
            out[i].extend(idx[start : start + take[i]].tolist())
            start += take[i]
    return [np.sort(np.asarray(o, dtype=np.int64)) for o in out]


def load_image_dataset(spec: TaskSpec) -> Any:
    """The :class:`robustlab.fedld.data.ImageDataset` named by the spec (``digits`` or a MedMNIST flag;
    the MedMNIST file at ``spec.image_size`` when the folder has it, else the 28 px one)."""
    from robustlab.fedld import data

    if spec.dataset == "digits":
        ds = data.load_digits_dataset(seed=0)
    elif spec.dataset == "sslfl":
        if not spec.data_dir:
            raise UserError("--dataset sslfl needs --data-dir", "pass the SSL-FL folder holding labels.csv")
        # images are kept at their stored size (or resized to --image-size while loading)
        ds = data.load_sslfl(spec.data_dir, split=spec.sslfl_split, image_size=spec.image_size or None)
    else:
        ds = None
        if spec.image_size in data.MEDMNIST_SIZES and spec.image_size != 28:
            try:
                ds = data.load_medmnist(
                    spec.dataset, size=spec.image_size, data_dir=spec.data_dir, download=False
                )
            except UserError:
                ds = None  # no file at that size: resize the 28 px images
        if ds is None:
            ds = data.load_medmnist(spec.dataset, data_dir=spec.data_dir)
    if ds.multi_label:
        raise UserError(
            f"{spec.dataset} is multi-label; FedLD's margin control and the label-skew split need one label per image",
            "use a single-label dataset such as retinamnist or pneumoniamnist",
        )
    if ds.val is None:
        ds = data.holdout_validation(ds, 0.1, seed=0)
    return ds


@functools.lru_cache(maxsize=4)
def load_task(spec: TaskSpec) -> Task:
    """Load the dataset, partition the training split (Dirichlet, seeded) and the test split; cached."""
    from robustlab.fedld import data

    ds = load_image_dataset(spec)
    y_train = np.asarray(ds.train.labels, dtype=np.int64)
    if ds.natural_partitions is not None:  # SSL-FL: the clients are the split's client files
        if len(ds.natural_partitions) != spec.num_partitions:
            raise UserError(
                f"{ds.source} ({spec.sslfl_split}) has {len(ds.natural_partitions)} clients, not {spec.num_partitions}",
                f"pass --clients {len(ds.natural_partitions)}",
            )
        partitions = list(ds.natural_partitions)
    else:
        partitions = data.dirichlet_partition(
            y_train,
            spec.num_partitions,
            spec.beta,
            seed=spec.seed,
            min_partition_size=spec.min_partition_size,
        )
    partitions = [np.sort(np.asarray(p, dtype=np.int64)) for p in partitions]
    x_train, y_train_t, x_val, y_val, x_test, y_test = model_inputs(ds, spec)
    return Task(
        spec=spec,
        x_train=x_train,
        y_train=y_train_t,
        x_val=x_val,
        y_val=y_val,
        x_test=x_test,
        y_test=y_test,
        num_classes=int(ds.num_classes),
        in_channels=int(x_train.shape[1]),
        image_size=int(x_train.shape[-1]),
        partitions=partitions,
        test_partitions=split_test_like_train(
            y_train, partitions, y_test.numpy(), int(ds.num_classes), spec.seed
        ),
        val_partitions=split_test_like_train(
            y_train, partitions, y_val.numpy(), int(ds.num_classes), spec.seed + 1
        ),
        source=str(ds.source),
        source_image_size=int(ds.image_size),
    )


def model_inputs(ds: Any, spec: TaskSpec) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_val, y_val, x_test, y_test) as the model expects them.

    The CNN gets the images normalised per channel with the training split's mean and std. A backbone
    (:data:`robustlab.fedld.models.BACKBONES`) gets 3 channels (grey repeated) normalised with the
    ImageNet mean and std, the statistics its pretrained weights were trained with. With
    ``spec.image_size`` the normalised images are resized (bilinear, antialiased when shrinking)."""
    from robustlab.fedld import models

    if spec.image_size < 0:
        raise UserError(
            f"--image-size must be >= 0, got {spec.image_size}", "use e.g. 64 (0 = the data's own)"
        )
    backbone = spec.model.lower() in models.BACKBONES
    if backbone:
        mean, std = np.asarray(models.IMAGENET_MEAN), np.asarray(models.IMAGENET_STD)
    else:
        mean, std = ds.train.channel_stats()
    out: list[torch.Tensor] = []
    for split in (ds.train, ds.val, ds.test):
        x, y = split.tensors(mean, std, channels=3 if backbone else None)
        size = spec.image_size
        if size and size != x.shape[-1]:
            x = (
                torch.cat(
                    [
                        torch.nn.functional.interpolate(
                            x[i : i + 256],
                            size=(size, size),
                            mode="bilinear",
                            align_corners=False,
                            antialias=size < x.shape[-1],
                        )
                        for i in range(0, len(x), 256)
                    ]
                )
                if len(x)
                else x.new_zeros((0, x.shape[1], size, size))
            )
        out += [x.contiguous(), y]
    return tuple(out)
