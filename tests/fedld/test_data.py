"""Data loaders and partitions: real MedMNIST files (shared_data), synthetic files in every format, the
errors a user can hit, Dirichlet partitions (sizes, minimum, determinism, skew vs beta) and histograms."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest

from robustlab.errors import UserError
from robustlab.fedld.data import (
    dirichlet_partition,
    holdout_validation,
    iid_partition,
    label_histogram,
    label_skew,
    load_digits_dataset,
    load_medmnist,
    load_sslfl,
    medmnist_candidates,
    natural_partition,
    plot_label_histogram,
)


@pytest.fixture(scope="module")
def medmnist_dir(shared_data):
    path = shared_data / "medmnist"
    if not (path / "retinamnist.npz").is_file():
        pytest.skip("retinamnist.npz not staged")
    return path


@pytest.fixture(scope="module")
def retina(medmnist_dir):
    return load_medmnist("retinamnist", data_dir=medmnist_dir)


def write_npz(path, n=(12, 4, 6), size=28, channels=3, label_cols=1, classes=5, seed=0, **override):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        shape = (count, size, size) if channels == 1 else (count, size, size, channels)
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, classes if label_cols == 1 else 2, size=(count, label_cols),
                                                 dtype=np.uint8)  # fmt: skip
    arrays.update(override)
    np.savez(path, **arrays)
    return arrays


# ----------------------------------------------------------------------------------------------
# MedMNIST: real files


def test_retinamnist_real_file(retina):
    assert (len(retina.train), len(retina.val), len(retina.test)) == (1080, 120, 400)
    assert retina.train.images.shape == (1080, 28, 28, 3) and retina.train.images.dtype == np.uint8
    assert retina.num_classes == 5 and retina.task == "ordinal-regression" and retina.channels == 3
    # class counts from shared/data/README.md
    assert np.bincount(retina.train.labels).tolist() == [486, 128, 206, 194, 66]
    assert np.bincount(retina.test.labels).tolist() == [174, 46, 92, 68, 20]


def test_pneumonia_staged_and_official_names(medmnist_dir, tmp_path):
    staged = load_medmnist("pneumoniamnist", data_dir=medmnist_dir)  # finds pneumoniamnist_balanced.npz
    assert staged.source.endswith("pneumoniamnist_balanced.npz")
    assert (len(staged.train), len(staged.val), len(staged.test)) == (2428, 270, 468)
    assert staged.channels == 1 and staged.num_classes == 2
    assert np.bincount(staged.train.labels).tolist() == [1214, 1214]
    assert load_medmnist("pneumoniamnist_balanced", data_dir=medmnist_dir).source == staged.source
    # the official name is found first when both exist
    shutil.copy(medmnist_dir / "pneumoniamnist_balanced.npz", tmp_path / "pneumoniamnist.npz")
    official = load_medmnist("pneumoniamnist", data_dir=tmp_path)
    assert official.source.endswith("pneumoniamnist.npz")
    np.testing.assert_array_equal(official.test.labels, staged.test.labels)
    # a path to the file also works
    assert len(load_medmnist(str(tmp_path / "pneumoniamnist.npz")).train) == 2428


def test_tensors_are_normalised_channels_first(retina):
    mean, std = retina.train.channel_stats()
    x, y = retina.train.tensors(mean, std)
    assert tuple(x.shape) == (1080, 3, 28, 28) and str(x.dtype) == "torch.float32"
    per_channel = x.permute(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(per_channel.mean(1).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(per_channel.std(1).numpy(), 1, atol=1e-3)
    assert y.tolist() == retina.train.labels.tolist()
    # pixel (0, 0, 0, c) by hand
    c = 1
    expected = (retina.train.images[0, 0, 0, c] / 255.0 - mean[c]) / std[c]
    assert float(x[0, c, 0, 0]) == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# MedMNIST: synthetic files and errors


def test_any_flag_and_size(tmp_path):
    arrays = write_npz(tmp_path / "dermamnist_64.npz", size=64, classes=7)
    ds = load_medmnist("dermamnist", size=64, data_dir=tmp_path)
    assert ds.image_size == 64 and ds.num_classes == 7 and ds.task == "multi-class"
    np.testing.assert_array_equal(ds.val.images, arrays["val_images"])
    write_npz(tmp_path / "chestmnist.npz", channels=1, label_cols=14)
    chest = load_medmnist("chestmnist", data_dir=tmp_path)
    assert chest.multi_label and chest.train.labels.shape == (12, 14) and chest.channels == 1
    x, y = chest.train.tensors()
    assert tuple(x.shape) == (12, 1, 28, 28) and str(y.dtype) == "torch.float32"
    assert medmnist_candidates("retinamnist", 128) == ["retinamnist_128.npz", "retinamnist_128_balanced.npz"]


def test_missing_file_names_file_and_folder(tmp_path):
    with pytest.raises(UserError) as err:
        load_medmnist("octmnist", data_dir=tmp_path)
    msg = str(err.value)
    assert "octmnist.npz" in msg and str(tmp_path) in msg and "zenodo" in msg
    with pytest.raises(UserError, match="unknown MedMNIST"):
        load_medmnist("notadataset", data_dir=tmp_path)
    with pytest.raises(UserError, match="size"):
        load_medmnist("retinamnist", size=32, data_dir=tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_medmnist(str(tmp_path / "nothere.npz"))


def test_corrupt_and_inconsistent_files(tmp_path):
    (tmp_path / "retinamnist.npz").write_bytes(b"this is not a zip archive at all")
    with pytest.raises(UserError, match="corrupt"):
        load_medmnist("retinamnist", data_dir=tmp_path)
    # truncated archive
    write_npz(tmp_path / "full.npz")
    data = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "retinamnist.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt"):
        load_medmnist("retinamnist", data_dir=tmp_path)
    # missing keys
    np.savez(tmp_path / "retinamnist.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(UserError, match="missing"):
        load_medmnist("retinamnist", data_dir=tmp_path)
    # image/label count mismatch
    write_npz(tmp_path / "retinamnist.npz", val_labels=np.zeros((3, 1), np.uint8))
    with pytest.raises(UserError, match="4 images but 3 labels"):
        load_medmnist("retinamnist", data_dir=tmp_path)
    # labels out of range for the flag
    write_npz(tmp_path / "retinamnist.npz", test_labels=np.full((6, 1), 9, np.uint8))
    with pytest.raises(UserError, match="classes"):
        load_medmnist("retinamnist", data_dir=tmp_path)
    # wrong image size for the requested size
    write_npz(tmp_path / "retinamnist.npz", size=32)
    with pytest.raises(UserError, match="32 px"):
        load_medmnist("retinamnist", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------
# digits and SSL-FL


def test_digits_fallback():
    ds = load_digits_dataset(seed=0)
    assert len(ds.train) + len(ds.val) + len(ds.test) == 1797
    assert ds.train.images.shape[1:] == (8, 8, 1) and ds.train.images.max() == 255
    assert ds.num_classes == 10
    # stratified: every class in every split
    for split in (ds.train, ds.val, ds.test):
        assert np.all(np.bincount(split.labels, minlength=10) > 0)
    again = load_digits_dataset(seed=0)
    np.testing.assert_array_equal(again.test.labels, ds.test.labels)


def make_sslfl(root, rng):
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    clients = root / "5_clients" / "split_1"
    clients.mkdir(parents=True)
    labels = {}
    for i in range(10):
        name = f"tr{i}.npy"
        np.save(root / "train" / name, rng.uniform(0, 255, size=(40, 40, 3)))  # float 0..255, like Retina
        labels[name] = i % 2
    for i in range(4):
        name = f"te{i}.npy"
        np.save(root / "test" / name, rng.uniform(0, 255, size=(40, 40, 3)))
        labels[name] = (i + 1) % 2
    (root / "labels.csv").write_text("filename,label\n" + "".join(f"{k},{v}\n" for k, v in labels.items()))
    (root / "test.csv").write_text("".join(f"te{i}.npy\n" for i in range(4)))
    (clients / "client_1.csv").write_text("tr0.npy\ntr1.npy\ntr2.npy\n")
    (clients / "client_2.csv").write_text("tr3.npy\ntr4.npy\ntr5.npy\ntr6.npy\ntr7.npy\ntr8.npy\ntr9.npy\n")
    return labels


def test_sslfl_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "Retina"
    make_sslfl(root, rng)
    ds = load_sslfl(root, "split_1", image_size=28)
    assert len(ds.train) == 10 and len(ds.test) == 4 and ds.val is None
    assert ds.train.images.shape == (10, 28, 28, 3) and ds.train.images.dtype == np.uint8
    assert [p.tolist() for p in ds.natural_partitions] == [[0, 1, 2], [3, 4, 5, 6, 7, 8, 9]]
    assert ds.train.labels.tolist() == [i % 2 for i in range(10)]
    assert ds.test.labels.tolist() == [1, 0, 1, 0]
    assert ds.num_classes == 2
    # unresized keeps 40 px and the pixel values (float 0..255 -> uint8 by rounding)
    raw = load_sslfl(root, "split_1", image_size=None)
    expected = np.clip(np.rint(np.load(root / "train" / "tr3.npy")), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(raw.train.images[3], expected)
    with_val = holdout_validation(ds, 0.2, seed=0)
    assert len(with_val.train) == 8 and len(with_val.val) == 2
    assert sum(len(p) for p in with_val.natural_partitions) == 8
    # errors
    with pytest.raises(UserError, match="no <n>_clients/split_9"):
        load_sslfl(root, "split_9")
    (root / "train" / "tr5.npy").unlink()
    with pytest.raises(UserError, match="missing"):
        load_sslfl(root, "split_1")
    with pytest.raises(UserError, match="does not exist"):
        load_sslfl(tmp_path / "nope")


# ----------------------------------------------------------------------------------------------
# partitions on real data


@pytest.mark.parametrize("beta", [100, 1, 0.5])
def test_dirichlet_partition_sizes_and_determinism(retina, beta):
    labels = retina.train.labels
    parts = dirichlet_partition(labels, 5, beta, min_partition_size=10, seed=3)
    assert len(parts) == 5
    assert sum(len(p) for p in parts) == len(labels)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))  # disjoint cover
    assert min(len(p) for p in parts) >= 10
    again = dirichlet_partition(labels, 5, beta, min_partition_size=10, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = dirichlet_partition(labels, 5, beta, min_partition_size=10, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_label_skew_grows_as_beta_shrinks(medmnist_dir, retina):
    pneu = load_medmnist("pneumoniamnist", data_dir=medmnist_dir)
    for ds, betas in ((retina, (100, 1, 0.5, 0.1)), (pneu, (100, 1, 0.1))):
        labels = ds.train.labels
        means = []
        for beta in betas:
            skews = [label_skew(label_histogram(labels, dirichlet_partition(labels, 5, beta, seed=s), ds.num_classes))
                     for s in range(6)]  # fmt: skip
            means.append(np.mean(skews))
        assert all(a < b for a, b in itertools.pairwise(means)), (ds.name, means)
        assert means[0] < 0.1 < means[-1]


def test_bad_partition_settings_are_user_errors(retina):
    labels = retina.train.labels
    for beta in (0, -1, float("nan"), float("inf")):
        with pytest.raises(UserError, match="beta"):
            dirichlet_partition(labels, 5, beta)
    with pytest.raises(UserError, match="only 1080"):
        dirichlet_partition(labels, 2000, 1.0, min_partition_size=0)
    with pytest.raises(UserError, match="min partition size"):
        dirichlet_partition(labels, 5, 1.0, min_partition_size=300)
    with pytest.raises(UserError, match="could not draw"):
        dirichlet_partition(labels[:60], 5, 0.05, min_partition_size=11)
    with pytest.raises(UserError, match="one label per sample"):
        dirichlet_partition(np.zeros((20, 14), np.int64), 2, 1.0, min_partition_size=1)
    with pytest.raises(UserError):
        dirichlet_partition(labels, 0, 1.0)


def test_histogram_skew_and_plot(tmp_path):
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    parts = [np.array([0, 1, 7]), np.array([2, 3]), np.array([4, 5, 6])]
    counts = label_histogram(labels, parts, 3)
    assert counts.tolist() == [[3, 0, 0], [0, 2, 0], [0, 0, 3]]
    # pooled (3/8, 2/8, 3/8); client TVs 5/8, 6/8, 5/8; weighted by sizes 3, 2, 3
    assert label_skew(counts) == pytest.approx((3 * 5 / 8 + 2 * 6 / 8 + 3 * 5 / 8) / 8)
    assert label_skew(np.array([[2, 4], [1, 2]])) == pytest.approx(0.0)
    multi = label_histogram(np.array([[1, 0], [1, 1], [0, 1]]), [np.array([0, 1]), np.array([2])])
    assert multi.tolist() == [[2, 1], [0, 1]]
    png = plot_label_histogram(counts, tmp_path / "hist.png", class_names=["a", "b", "c"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_natural_and_iid_partitions():
    parts = natural_partition(["b", "a", "b", "c", "a"])
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2], [3]]
    iid = iid_partition(10, 3, seed=1)
    assert sorted(len(p) for p in iid) == [3, 3, 4]
    np.testing.assert_array_equal(np.sort(np.concatenate(iid)), np.arange(10))
    with pytest.raises(UserError):
        iid_partition(2, 3)


def _fake_medmnist(monkeypatch, fail: bool):
    """A stand-in ``medmnist`` package (the real one is not installed and tests stay offline)."""
    import importlib.machinery
    import sys
    import types

    module = types.ModuleType("medmnist")
    module.__spec__ = importlib.machinery.ModuleSpec("medmnist", None)
    module.INFO = {"octmnist": {"python_class": "OCTMNIST"}}
    calls = []

    class OCTMNIST:
        def __init__(self, split, download, root, size):
            calls.append((split, download, root, size))
            if fail:
                raise OSError("Network is unreachable")
            write_npz(f"{root}/octmnist.npz", channels=1, classes=4)

    module.OCTMNIST = OCTMNIST
    monkeypatch.setitem(sys.modules, "medmnist", module)
    return calls


def test_download_through_medmnist_when_installed(tmp_path, monkeypatch):
    calls = _fake_medmnist(monkeypatch, fail=False)
    ds = load_medmnist("octmnist", data_dir=tmp_path / "cache")
    assert calls == [("train", True, str(tmp_path / "cache"), 28)]
    assert ds.num_classes == 4 and len(ds.train) == 12
    # no download is attempted when asked not to
    with pytest.raises(UserError, match="not found"):
        load_medmnist("octmnist", data_dir=tmp_path / "other", download=False)


def test_failed_download_is_one_line_user_error(tmp_path, monkeypatch):
    _fake_medmnist(monkeypatch, fail=True)
    with pytest.raises(UserError) as err:
        load_medmnist("octmnist", data_dir=tmp_path)
    assert "could not download" in str(err.value) and "\n" not in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_sslfl_png_images_and_real_split(tmp_path):
    """COVID-FL layout: png images, 12_clients/split_real, three classes."""
    from PIL import Image

    root = tmp_path / "COVID-FL"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    split = root / "12_clients" / "split_real"
    split.mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(root / "train" / f"a{i}.png")
        rows.append(f"a{i}.png,{i % 3}")
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(root / "test" / "t0.png")
    rows.append("t0.png,2")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "test.csv").write_text("t0.png\n")
    (split / "bimcv.csv").write_text("a0.png\na1.png\n")
    (split / "cohen.csv").write_text("a2.png\na3.png\na4.png\na5.png\n")
    ds = load_sslfl(root, "split_real", image_size=16)
    assert ds.train.images.shape == (6, 16, 16, 3) and ds.num_classes == 3 and ds.task == "multi-class"
    assert [len(p) for p in ds.natural_partitions] == [2, 4]
    assert ds.train.labels.tolist() == [0, 1, 2, 0, 1, 2]


# ----------------------------------------------------------------------------------------------
# what a backbone sees: 3 channels, ImageNet normalisation, the requested size


def test_backbone_inputs_are_three_channel_imagenet_normalised_and_resized(tmp_path):
    import torch

    from robustlab.fedld.models import IMAGENET_MEAN, IMAGENET_STD
    from robustlab.fedld.task import TaskSpec, load_task

    raw = write_npz(tmp_path / "pneumoniamnist.npz", n=(40, 10, 10), channels=1, classes=2)
    spec = TaskSpec("pneumoniamnist", str(tmp_path), 2, 1.0, 0, min_partition_size=1)
    cnn = load_task(spec)
    assert cnn.x_train.shape == (40, 1, 28, 28) and cnn.in_channels == 1  # the CNN path is unchanged
    lite = load_task(TaskSpec(**{**spec.__dict__, "model": "efficientnet-lite0", "image_size": 28}))
    img = raw["train_images"][3].astype(np.float64) / 255.0
    for c in range(3):  # grey repeated, then (x - mean_c) / std_c, at the native size (no resize)
        want = (img - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        np.testing.assert_allclose(lite.x_train[3, c].numpy(), want, rtol=1e-5, atol=1e-5)
    big = load_task(TaskSpec(**{**spec.__dict__, "model": "efficientnet-lite0", "image_size": 64}))
    assert big.x_train.shape == (40, 3, 64, 64) and big.image_size == 64 and big.source_image_size == 28
    # bilinear upsampling of the normalised images (a linear map commutes with the per-channel affine)
    ref = torch.nn.functional.interpolate(
        lite.x_train[:2], size=(64, 64), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(big.x_train[:2], ref)
    # a MedMNIST file at the asked size is used as it is
    write_npz(tmp_path / "pneumoniamnist_64.npz", n=(40, 10, 10), size=64, channels=1, classes=2, seed=1)
    native = load_task(TaskSpec(**{**spec.__dict__, "model": "resnet18", "image_size": 64}))
    assert native.source.endswith("pneumoniamnist_64.npz") and native.source_image_size == 64
    assert native.build_model()(native.x_test[:2]).shape == (2, 2)
