"""Where and in which precision the antidote engine runs a model: one small :class:`Runtime` (device,
dtype, device map) that loading, training, calibration, evaluation, generation and the judges all take.

``auto`` picks CUDA + bfloat16 when a GPU is visible (float16 on a GPU without bfloat16), else CPU + float32,
the precision of the official Antidote code (``papers/antidote.md`` §1.4). A ``device_map`` is accelerate's
(``auto``, ``balanced``, ``balanced_low_0``, ``sequential`` or an explicit ``{module: device}`` mapping), for
models larger than one GPU; inputs then go to the device of the input embedding.

Every choice is checked when the runtime is built, before anything is loaded or written: an unknown device
or dtype, a CUDA device that is not there, or a device map without accelerate raise
:class:`~robustlab.errors.UserError`. Importing this module does not import torch.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import inspect
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from robustlab.errors import UserError

__all__ = [
    "DEVICE_MAPS",
    "DTYPES",
    "Runtime",
    "device_map_option",
    "device_option",
    "dtype_option",
    "use_runtime",
    "with_runtime_options",
]

#: Accepted ``--dtype`` spellings and the torch dtype each names (``auto`` is resolved by the device).
DTYPES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
#: accelerate's named device maps.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _parse_device(device: Any) -> str:
    text = str(device if device is not None else "auto").strip().lower()
    if text == "auto":
        return "cuda:0" if _cuda_count() > 0 else "cpu"
    m = _DEVICE.match(text)
    if not m:
        raise UserError(f"unknown device {device!r}", "use --device auto, cpu, cuda or cuda:N")
    if m.group(1) == "cpu":
        if m.group(2) is not None:
            raise UserError(f"unknown device {device!r}", "use --device cpu (CPUs take no index)")
        return "cpu"
    count = _cuda_count()
    if count == 0:
        import torch

        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise UserError(
            f"--device {text} but no CUDA GPU is visible (torch {torch.__version__}, {build})",
            "use --device cpu (or auto), or run where a GPU and a CUDA build of torch are installed",
        )
    index = int(m.group(2) or 0)
    if index >= count:
        raise UserError(
            f"--device {text} but only {count} CUDA GPU(s) are visible (cuda:0..cuda:{count - 1})",
            "pick an existing GPU index",
        )
    return f"cuda:{index}"


def _parse_dtype(dtype: Any, device: str) -> str:
    text = str(dtype if dtype is not None else "auto").strip().lower().replace("torch.", "")
    if text == "auto":
        if device.startswith("cuda"):
            import torch

            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if text not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}", "use --dtype auto, float32, bfloat16 or float16")
    return DTYPES[text]


def _parse_device_map(device_map: Any) -> str | dict[str, Any] | None:
    if device_map is None or (isinstance(device_map, str) and not device_map.strip()):
        return None
    if isinstance(device_map, Mapping):
        parsed: Any = dict(device_map)
    else:
        text = str(device_map).strip()
        if text in DEVICE_MAPS:
            parsed = text
        elif text.startswith("{"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"--device-map {text!r} is not valid JSON ({exc.msg})",
                    "pass e.g. --device-map auto or --device-map '{\"\": 0}'",
                ) from exc
        else:
            raise UserError(
                f"unknown device map {text!r}",
                f"use one of {', '.join(DEVICE_MAPS)} or a JSON object {{module: device}}",
            )
    if importlib.util.find_spec("accelerate") is None:
        raise UserError("--device-map needs the accelerate package", "pip install accelerate")
    return parsed


@dataclass(frozen=True)
class Runtime:
    """A resolved device (``"cpu"`` or ``"cuda:N"``), dtype name (``"float32"``, ``"bfloat16"``,
    ``"float16"``) and optional accelerate ``device_map``. Build it with :meth:`resolve`; it is immutable,
    picklable and JSON-describable (:meth:`describe`)."""

    device: str = "cpu"
    dtype: str = "float32"
    device_map: str | dict[str, Any] | None = None

    @classmethod
    def resolve(cls, device: Any = "auto", dtype: Any = "auto", device_map: Any = None) -> Runtime:
        """Check and resolve user choices (``auto`` → CUDA + bf16 when a GPU is visible, else CPU + fp32)."""
        dev = _parse_device(device)
        return cls(device=dev, dtype=_parse_dtype(dtype, dev), device_map=_parse_device_map(device_map))

    @classmethod
    def current(cls) -> Runtime:
        """The runtime of the enclosing :func:`use_runtime` block (a command's ``--device/--dtype/
        --device-map``), else ``Runtime.resolve()`` (``auto``)."""
        entered = _CURRENT.get()
        return entered if entered is not None else cls.resolve()

    @classmethod
    def entered(cls) -> Runtime | None:
        """The runtime of the enclosing :func:`use_runtime` block, or ``None`` outside one."""
        return _CURRENT.get()

    @classmethod
    def cpu(cls) -> Runtime:
        """CPU, float32: the official code's precision, and the reference every test compares against."""
        return cls("cpu", "float32", None)

    # ------------------------------------------------------------------ torch views

    @property
    def torch_device(self) -> Any:
        import torch

        return torch.device(self.device)

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def low_precision(self) -> bool:
        return self.dtype in ("bfloat16", "float16")

    # ------------------------------------------------------------------ models and batches

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``from_pretrained``: the dtype, and the device map when there is one."""
        kwargs: dict[str, Any] = {"dtype": self.torch_dtype}
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        return kwargs

    def place(self, model: Any) -> Any:
        """Move ``model`` to the device and dtype, unless a device map already placed it. Floating-point
        parameters only: integer buffers keep their dtype."""
        if self.device_map is not None or getattr(model, "hf_device_map", None):
            return model
        return model.to(device=self.torch_device, dtype=self.torch_dtype)

    def input_device(self, model: Any | None = None) -> Any:
        """Where a batch for ``model`` goes: the input embedding's device (which a device map chooses), else
        the device of the first parameter, else this runtime's device."""
        import torch

        if model is not None:
            with contextlib.suppress(Exception):
                return model.get_input_embeddings().weight.device
            for p in model.parameters():
                return p.device
        return torch.device(self.device)

    def to_device(self, batch: Mapping[str, Any], model: Any | None = None) -> dict[str, Any]:
        """A copy of ``batch`` with every tensor on :meth:`input_device` (other values unchanged)."""
        import torch

        dev = self.input_device(model)
        return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """``torch.autocast`` in the runtime's dtype for bfloat16/float16 (so float32 adapter weights compute
        in low precision beside a low-precision base); a no-op for float32."""
        import torch

        if not self.low_precision:
            yield
            return
        with torch.autocast(device_type=self.torch_device.type, dtype=self.torch_dtype):
            yield

    def grad_scaler(self) -> Any | None:
        """A ``torch.amp.GradScaler`` for float16 training on CUDA (float16 gradients underflow without loss
        scaling); ``None`` otherwise (float32 and bfloat16 need none)."""
        if self.dtype != "float16" or not self.is_cuda:
            return None
        import torch

        return torch.amp.GradScaler("cuda")

    def synchronize(self) -> None:
        if self.is_cuda:
            import torch

            torch.cuda.synchronize(self.torch_device)

    def describe(self) -> dict[str, Any]:
        """What ran where, for ``env.json`` / ``realign.json``: device, dtype, device map and the GPU name."""
        info: dict[str, Any] = {"device": self.device, "dtype": self.dtype, "device_map": self.device_map}
        if self.is_cuda:
            import torch

            info["gpu"] = torch.cuda.get_device_name(self.torch_device)
        return info


_CURRENT: contextvars.ContextVar[Runtime | None] = contextvars.ContextVar("antidote_runtime", default=None)


@contextlib.contextmanager
def use_runtime(runtime: Runtime) -> Iterator[Runtime]:
    """Within the block, stages called without an explicit ``runtime`` use this one (loading, training,
    evaluation): how a command's flags reach code several calls down without threading an argument
    through every configuration object. Scoped, not global: the previous runtime returns on exit."""
    token = _CURRENT.set(runtime)
    try:
        yield runtime
    finally:
        _CURRENT.reset(token)


# --------------------------------------------------------------------------- CLI options

# Factories rather than shared constants: each command gets its own typer.Option object.


def device_option() -> Any:
    import typer

    return typer.Option(
        "auto", "--device", help="auto | cpu | cuda | cuda:N (auto: the GPU when there is one, else CPU)."
    )


def dtype_option() -> Any:
    import typer

    return typer.Option(
        "auto", "--dtype", help="auto | float32 | bfloat16 | float16 (auto: bf16 on a GPU, fp32 on CPU)."
    )


def device_map_option() -> Any:
    import typer

    return typer.Option(
        None,
        "--device-map",
        help="accelerate device map for models larger than one GPU: auto | balanced | sequential | JSON.",
    )


def with_runtime_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` (a typer command function) with ``--device``, ``--dtype`` and ``--device-map`` added: the
    runtime is resolved (and checked) first, then ``command`` runs inside :func:`use_runtime`."""
    sig = inspect.signature(command)
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=factory(), annotation=str)
        for name, factory in (
            ("device", device_option),
            ("dtype", dtype_option),
            ("device_map", device_map_option),
        )
    ]

    @functools.wraps(command)
    def run(
        *args: Any, device: str = "auto", dtype: str = "auto", device_map: str | None = None, **kwargs: Any
    ) -> Any:
        with use_runtime(Runtime.resolve(device, dtype, device_map)):
            return command(*args, **kwargs)

    run.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])  # type: ignore[attr-defined]
    run.__annotations__ = {
        **getattr(command, "__annotations__", {}),
        "device": "str",
        "dtype": "str",
        "device_map": "str",
    }
    return run
