"""Pieces every ``robustlab antidote`` command shares. No torch / transformers at import time:
``robustlab --help`` imports every sub-app."""

from __future__ import annotations


def quiet_transformers() -> None:
    """Silence transformers' progress bars and info logs, so the CLI's output (and a one-line error) stays
    readable. Only commands that load models call this."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import sys

    if not sys.stderr.isatty():
        # GGUF de-quantisation draws its own tqdm bar (not transformers' switch): off when logging to a file
        import functools

        from transformers import modeling_gguf_pytorch_utils as gguf_utils

        if not isinstance(gguf_utils.tqdm, functools.partial):
            gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
    import warnings

    # peft's get_peft_model reads a property transformers has deprecated (one FutureWarning per adapter)
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing.*")
