"""The models the planner knows by name, and models from a file, built on the meta device.

On the meta device a parameter has a shape and a dtype but no storage, so a 70B model is
"built" in a fraction of a second without allocating a byte.

A model file (``--model path/to/model.py``) defines ``build_model()``, which returns an
``nn.Module``; the planner calls it under ``torch.device("meta")``, so every tensor it creates
without an explicit device lands on the meta device.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from distsoap.plan.gpt2 import GPT2, GPT2Config
from distsoap.plan.llama import Llama, LlamaConfig
from distsoap.plan.options import PlanError

LLAMA3_VOCAB = 128256

PRESETS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "gpt2-124m": (
        "GPT-2 small: vocab 50257, 1024 positions, d 768, 12 layers, LM head tied to wte",
        lambda: GPT2(GPT2Config()),
    ),
    "llama3-8b": (
        "Llama 3 8B: dim 4096, 32 layers, 32 heads, 8 KV heads, FFN 14336, vocab 128256",
        lambda: Llama(LlamaConfig(4096, 32, 32, 8, 14336, LLAMA3_VOCAB)),
    ),
    "llama3-70b": (
        "Llama 3 70B: dim 8192, 80 layers, 64 heads, 8 KV heads, FFN 28672, vocab 128256",
        lambda: Llama(LlamaConfig(8192, 80, 64, 8, 28672, LLAMA3_VOCAB)),
    ),
    "llama3-405b": (
        "Llama 3 405B: dim 16384, 126 layers, 128 heads, 8 KV heads, FFN 53248, vocab 128256",
        lambda: Llama(LlamaConfig(16384, 126, 128, 8, 53248, LLAMA3_VOCAB)),
    ),
    "gpt2-tiny": (
        "a small GPT-2 for tests: vocab 96, 16 positions, d 32, 2 layers, tied LM head",
        lambda: GPT2(GPT2Config(vocab_size=96, n_positions=16, dim=32, n_layers=2)),
    ),
    "llama3-tiny": (
        "a small Llama 3 for tests: dim 32, 2 layers, 4 heads, 2 KV heads, FFN 80, vocab 128",
        lambda: Llama(LlamaConfig(32, 2, 4, 2, 80, 128)),
    ),
    "moe-tiny": (
        "a small Llama 3 MoE for tests: dim 32, 2 layers, 4 experts of FFN 48, vocab 128",
        lambda: Llama(LlamaConfig(32, 2, 4, 2, 48, 128, num_experts=4)),
    ),
}
"""Name -> (description, builder)."""


def _load_file(path: Path) -> Callable[[], nn.Module]:
    """The ``build_model`` function of a model file."""
    if not path.is_file():
        raise PlanError(f"model file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_distsoap_plan_model_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise PlanError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    build = getattr(module, "build_model", None)
    if not callable(build):
        raise PlanError(f"{str(path)!r} must define build_model(), returning an nn.Module")
    return build


def build_model(name: str, device: torch.device | str = "meta") -> nn.Module:
    """Build a preset (:data:`PRESETS`) or a model file's ``build_model()`` on ``device``.

    Args:
        name: a preset name, or the path of a ``.py`` file defining ``build_model()``.
        device: where tensors are created: the meta device (no memory) for planning, a real
            device to train or to check the plan against a real optimizer.

    Raises:
        PlanError: an unknown name, or a file without ``build_model()`` returning a module.
    """
    if name in PRESETS:
        build = PRESETS[name][1]
    elif name.endswith(".py"):
        build = _load_file(Path(name))
    else:
        raise PlanError(
            f"unknown model {name!r}: give one of {', '.join(PRESETS)}, or the path of a .py "
            "file that defines build_model()"
        )
    with torch.device(device):
        model = build()
    if not isinstance(model, nn.Module):
        raise PlanError(f"build_model() of {name!r} returned {type(model).__name__}, not a Module")
    return model
