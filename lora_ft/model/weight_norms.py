"""The Frobenius norm of each adapted module's base weight, read from disk shard by shard (or through transformers for
a .gguf base), for inspect's ||ΔW|| / ||W||. Never raises: an unavailable base only costs the relative norms."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from huggingface_hub import try_to_load_from_cache
from safetensors import safe_open

from lora_ft.errors import LoraftError
from lora_ft.model.loading import load_base_model


def base_weight_norms(run, shapes: Mapping[str, tuple[int, int]], base: str | None = None) -> tuple[dict[str, float], str]:
    """(||W||_F per module, a note saying where they came from or why they are missing). Never raises:
    an unavailable base only costs the relative norms."""
    name = base or run.base_name
    if not name:
        return {}, "base: the adapter records no base model (pass --base MODEL); ||dW||/||W|| not reported"
    if uncached_hub_id(name):
        return {}, f"base: {name} is not in the local Hugging Face cache (pass --base PATH); ||dW||/||W|| not reported"
    try:
        spec, source, _ = run.resolve_base(base)
        if source.gguf_file is not None:
            named = _gguf_weights(spec, source)
        else:
            named = _safetensors_weights(Path(source.path))
        norms = _match_norms(named, shapes)
    except LoraftError as exc:
        return {}, f"base: {exc}; ||dW||/||W|| not reported"
    missing = len(shapes) - len(norms)
    note = f"base: {source.display}"
    if missing:
        note += f" ({missing} of {len(shapes)} modules have no dense weight of the right shape there)"
    return norms, note


def uncached_hub_id(name: str) -> bool:
    """A Hub id we would have to download (gigabytes) just for its norms: not worth it for inspect."""
    if name.startswith(("pkg://", ".", "/", "~")) or os.path.exists(os.path.expanduser(name)) or name.endswith(".gguf"):
        return False

    return not isinstance(try_to_load_from_cache(name, "config.json"), str)


def _safetensors_weights(model_dir: Path):
    """Yield (name, tensor) for every 2-D tensor, one shard open at a time."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LoraftError(f"{model_dir}: no .safetensors weights")
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(".weight") and len(handle.get_slice(key).get_shape()) == 2:
                    yield key, handle.get_tensor(key)


def _gguf_weights(spec, source):
    """A .gguf base has no safetensors to read: transformers dequantizes it into a model, once."""
    model = load_base_model(spec, source, "fp32")
    for key, tensor in model.state_dict().items():
        if tensor.dim() == 2:
            yield key, tensor
    del model


def _match_norms(named, shapes: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    """Base tensor `x.weight` belongs to adapter module `x`, allowing a differing prefix (model. vs none)."""
    by_tail = {}
    for module in shapes:
        parts = module.split(".")
        for i in range(len(parts)):
            by_tail.setdefault(".".join(parts[i:]), module)
    norms = {}
    for key, tensor in named:
        stem = key.removesuffix(".weight")
        parts = stem.split(".")
        module = next((by_tail[".".join(parts[i:])] for i in range(len(parts)) if ".".join(parts[i:]) in by_tail), None)
        if module is None or module in norms:
            continue
        # Packed 4-/8-bit storage or a shape that is not the module's: no honest norm to give.
        if tensor.dtype in (torch.uint8, torch.int8) or tuple(tensor.shape) not in (shapes[module], shapes[module][::-1]):
            continue
        norms[module] = float(tensor.float().norm())
    return norms
