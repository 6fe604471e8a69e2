"""A model's module tree without its weights: names and shapes on the meta device, and the LoRA targets they allow.

The lowest layer of lora_ft.model: loading, coverage and stop_tokens all read shapes through it, so none of them
needs another to know what a model looks like.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from lora_ft.config import ATTENTION_MODULES, MLP_MODULES, LoraSpec
from lora_ft.errors import ModelError


def meta_model(model_config, trust_remote_code: bool = False):
    """The model's module tree on the meta device: shapes and names, no memory."""
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
        except ValueError as exc:
            raise ModelError(f"model.name: not a causal language model ({first_line(exc)})") from None


def linear_module_names(model) -> list[str]:
    """Leaf names of the linear layers LoRA can adapt (lm_head excluded)."""
    names = set()
    for full_name, module in model.named_modules():
        leaf = full_name.rsplit(".", 1)[-1]
        if leaf == "lm_head":
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(leaf)
    return sorted(names)


def resolve_target_modules(lora: LoraSpec, available: list[str]) -> list[str] | str:
    """The target list PEFT gets; a name the model does not have is a user error."""
    if lora.target_modules == "all-linear":
        return "all-linear"
    if lora.target_modules in ("attention", "mlp"):
        wanted = ATTENTION_MODULES if lora.target_modules == "attention" else MLP_MODULES
        found = [name for name in wanted if name in available]
        if not found:
            raise ModelError(
                f"lora.target_modules: preset {lora.target_modules!r} matches no layer of this model; "
                f"its linear layers are: {', '.join(available)}"
            )
        return found
    missing = [name for name in lora.target_modules if name not in available]
    if missing:
        raise ModelError(
            f"lora.target_modules: {', '.join(missing)} not in this model; its linear layers are: {', '.join(available)}"
        )
    return list(lora.target_modules)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
