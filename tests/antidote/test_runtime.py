"""Runtime: resolution of device / dtype / device map, and what it does to models and batches."""

from __future__ import annotations

import pickle

import pytest
import torch

from robustlab.antidote.runtime import Runtime
from robustlab.errors import UserError

torch.set_num_threads(1)


def fake_gpus(monkeypatch, count: int, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_auto_is_cpu_float32_without_a_gpu(monkeypatch):
    fake_gpus(monkeypatch, 0)
    assert Runtime.resolve() == Runtime("cpu", "float32", None) == Runtime.cpu()


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bfloat16"), (False, "float16")])
def test_auto_is_cuda_bf16_with_a_gpu(monkeypatch, bf16, expected):
    fake_gpus(monkeypatch, 2, bf16)
    assert Runtime.resolve() == Runtime("cuda:0", expected, None)
    assert Runtime.resolve("cuda:1", "auto") == Runtime("cuda:1", expected, None)
    assert Runtime.resolve("cuda", "fp32").dtype == "float32"
    assert Runtime.resolve("cpu").dtype == "float32"  # auto dtype follows the device, not the machine


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("float32", torch.float32),
        ("bf16", torch.bfloat16),
        ("FP16", torch.float16),
        ("torch.bfloat16", torch.bfloat16),
    ],
)
def test_dtype_spellings(name, expected):
    assert Runtime.resolve("cpu", name).torch_dtype == expected


@pytest.mark.parametrize("dtype", ["float8", "int8", "half-ish", "float64"])
def test_unknown_dtype_is_a_user_error(dtype):
    with pytest.raises(UserError, match="unknown dtype"):
        Runtime.resolve("cpu", dtype)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:0", "tpu", "cuda:-1"])
def test_unknown_device_is_a_user_error(device):
    with pytest.raises(UserError, match="unknown device"):
        Runtime.resolve(device)


def test_cuda_without_a_gpu_is_a_user_error(monkeypatch):
    fake_gpus(monkeypatch, 0)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(UserError, match="no CUDA GPU is visible"):
            Runtime.resolve(device)


def test_cuda_index_beyond_the_visible_gpus_is_a_user_error(monkeypatch):
    fake_gpus(monkeypatch, 1)
    assert Runtime.resolve("cuda:0").device == "cuda:0"
    with pytest.raises(UserError, match="only 1 CUDA GPU"):
        Runtime.resolve("cuda:1")


def test_device_maps():
    assert Runtime.resolve("cpu", device_map=None).device_map is None
    assert Runtime.resolve("cpu", device_map="").device_map is None
    assert Runtime.resolve("cpu", device_map="auto").device_map == "auto"
    assert Runtime.resolve("cpu", device_map='{"": "cpu"}').device_map == {"": "cpu"}
    with pytest.raises(UserError, match="unknown device map"):
        Runtime.resolve("cpu", device_map="everywhere")
    with pytest.raises(UserError, match="not valid JSON"):
        Runtime.resolve("cpu", device_map="{oops")
    with pytest.raises(UserError, match="unknown device map"):
        Runtime.resolve("cpu", device_map="[1]")


def test_device_map_without_accelerate_is_a_user_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "accelerate" else real(n, *a))
    with pytest.raises(UserError, match="pip install accelerate"):
        Runtime.resolve("cpu", device_map="auto")


def test_load_kwargs_place_and_batches():
    rt = Runtime.resolve("cpu", "bfloat16")
    assert rt.load_kwargs() == {"dtype": torch.bfloat16}
    assert Runtime.resolve("cpu", device_map="auto").load_kwargs() == {
        "dtype": torch.float32,
        "device_map": "auto",
    }
    model = rt.place(torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 3)))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    batch = rt.to_device({"input_ids": torch.tensor([[1, 2]]), "n": 3}, model)
    assert batch["input_ids"].device.type == "cpu" and batch["n"] == 3
    assert rt.input_device(model).type == "cpu"
    # a device-mapped model is left where accelerate put it
    model.hf_device_map = {"": "cpu"}
    assert Runtime.cpu().place(model) is model and next(model.parameters()).dtype == torch.bfloat16


def test_autocast_computes_in_the_runtime_dtype_and_float32_is_untouched():
    lin = torch.nn.Linear(4, 3)  # float32 weights, as a LoRA adapter beside a bf16 base
    x = torch.randn(2, 4)
    with Runtime.resolve("cpu", "bfloat16").autocast():
        assert lin(x).dtype == torch.bfloat16
    with Runtime.cpu().autocast():
        y = lin(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x @ lin.weight.t() + lin.bias)
    assert Runtime.cpu().grad_scaler() is None and Runtime.resolve("cpu", "fp16").grad_scaler() is None


def test_runtime_is_immutable_picklable_and_describable():
    rt = Runtime.resolve("cpu", "bf16", "auto")
    assert pickle.loads(pickle.dumps(rt)) == rt
    assert rt.describe() == {"device": "cpu", "dtype": "bfloat16", "device_map": "auto"}
    with pytest.raises(AttributeError):
        rt.device = "cuda:0"  # type: ignore[misc]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_gpu_places_and_autocasts():
    rt = Runtime.resolve("cuda", "auto")
    lin = rt.place(torch.nn.Linear(4, 3))
    assert next(lin.parameters()).device.type == "cuda"
    with rt.autocast():
        assert lin(torch.randn(2, 4, device=rt.torch_device)).dtype == rt.torch_dtype


def test_use_runtime_is_scoped_and_restores_the_previous_one():
    from robustlab.antidote.runtime import use_runtime

    assert Runtime.entered() is None
    outer, inner = Runtime.resolve("cpu", "bf16"), Runtime.resolve("cpu", "fp16")
    with use_runtime(outer):
        assert Runtime.current() == outer
        with use_runtime(inner):
            assert Runtime.entered() == inner
        assert Runtime.entered() == outer
    assert Runtime.entered() is None and Runtime.current() == Runtime.resolve()


def test_with_runtime_options_resolves_first_and_runs_inside_the_runtime():
    from robustlab.antidote.runtime import with_runtime_options

    seen = []

    def command(x: int = 1) -> int:
        seen.append(Runtime.entered())
        return x

    wrapped = with_runtime_options(command)
    assert list(__import__("inspect").signature(wrapped).parameters) == ["x", "device", "dtype", "device_map"]
    assert wrapped(x=3, device="cpu", dtype="bf16") == 3 and seen == [Runtime("cpu", "bfloat16", None)]
    with pytest.raises(UserError, match="unknown dtype"):
        wrapped(device="cpu", dtype="float8")
    assert len(seen) == 1  # the command never ran
