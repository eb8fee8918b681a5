"""Models: shapes, the documented no-bias-before-BN choice, parameter count by hand, BN keys, optional
ResNets, and principal-gradient aggregation on real CNN deltas."""

from __future__ import annotations

import importlib.util

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


def test_unknown_model_and_missing_torchvision():
    with pytest.raises(UserError, match="unknown model"):
        build_model("vgg11")
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(UserError, match="torchvision"):
            build_model("resnet18", 5, 3, 28)
    else:  # pragma: no cover - depends on the environment
        model = build_model("resnet18", 5, 1, 28)
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 5)
        assert any("downsample.1" in k for k in batchnorm_keys(model))


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
