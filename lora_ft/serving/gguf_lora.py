"""A LoRA adapter as a llama.cpp GGUF: written as llama.cpp's convert_lora_to_gguf.py writes one, and read back as
llama-adapter.cpp loads it and build_lora_mm applies it (export's llamacpp and ollama targets).

Tensor names come from gguf-py's own map (as convert_hf_to_gguf.py names the base's); Q/K rows of lora_B are
permuted as the converter permuted the base's Q/K weights, and un-permuted on reading, so the read-back compares
with PEFT in HF's layout. Pitfall guarded: a file llama.cpp loads without complaint whose pairs miss their base
tensor or have the wrong shape (checked here against the base GGUF's own tensors when there is one).
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import torch

from lora_ft.artifacts.adapter import ModuleFactors
from lora_ft.errors import LoraftError, VerificationError
from lora_ft.model.shapes import linear_module_names, meta_model
from lora_ft.serving.engines import RULES, gguf_arch


def attention_heads(model_config) -> tuple[int, int]:
    """(query heads, key/value heads): what the Q and K row permutation is done over."""
    heads = model_config.num_attention_heads
    return heads, getattr(model_config, "num_key_value_heads", None) or heads


def gguf_names(modules: list[str], arch: str, n_layers: int) -> dict[str, str]:
    """HF module name -> the base GGUF tensor name, through gguf-py's own tensor map (as convert_hf_to_gguf)."""
    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    tmap = gguf.get_tensor_name_map(arch_id, n_layers)
    names = {}
    for module in modules:
        name = tmap.get_name(module)
        if name is None:
            raise LoraftError(f"--to llamacpp: gguf has no {arch} tensor name for {module}; use --to merged")
        names[module] = name + ".weight"
    return names


def permute_rows(B: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py LlamaModel.permute on the output rows (B's rows; LoraTorchTensor leaves A alone)."""
    return B.reshape(n_head, 2, B.shape[0] // n_head // 2, *B.shape[1:]).swapaxes(1, 2).reshape(B.shape)


def unpermute_rows(B: torch.Tensor, n_head: int) -> torch.Tensor:
    return B.reshape(n_head, B.shape[0] // n_head // 2, 2, *B.shape[1:]).swapaxes(1, 2).reshape(B.shape)


def qk_heads(module: str, heads: tuple[int, int] | None) -> int | None:
    """The heads a module's lora_B rows are permuted over: Q and K projections only (None: not permuted)."""
    if heads is None:
        return None
    if module.endswith("q_proj"):
        return heads[0]
    if module.endswith("k_proj"):
        return heads[1]
    return None


def write_gguf(path: Path, modules: list[ModuleFactors], alpha: float, arch: str, heads: tuple[int, int] | None) -> None:
    """A LoRA GGUF as convert_lora_to_gguf.py writes one: general.type=adapter, adapter.type=lora,
    adapter.lora.alpha (float32), tensors <base name>.lora_a (r, in) and .lora_b (out, r) in fp32,
    Q/K rows of B permuted like the base's Q/K weights were."""
    n_layers = 1 + max((int(x) for m in modules for x in re.findall(r"\.layers\.(\d+)\.", m.module)), default=0)
    names = gguf_names([m.module for m in modules], arch, n_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for m in sorted(modules, key=lambda m: names[m.module]):
        B = m.B.float()
        n = qk_heads(m.module, heads)
        if n is not None:
            B = permute_rows(B, n)
        writer.add_tensor(names[m.module] + ".lora_a", m.A.float().contiguous().numpy())
        writer.add_tensor(names[m.module] + ".lora_b", B.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_base_index(model_config, source) -> tuple[str, dict[str, str], dict[str, tuple[int, ...]], tuple[int, int] | None]:
    """(architecture, GGUF name -> HF module, GGUF name -> ne shape, Q/K heads if permuted) of the base.

    With a GGUF base the names and shapes are the file's own (what llama-adapter.cpp checks against);
    otherwise those convert_hf_to_gguf.py would give it."""
    arch, permute = gguf_arch(model_config.model_type)
    model = meta_model(model_config)
    leaves = set(linear_module_names(model))
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in leaves]
    to_gguf = gguf_names(linear, arch, model_config.num_hidden_layers)
    shapes = {to_gguf[n]: (model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in linear}
    if source.gguf_file is not None:
        reader = gguf.GGUFReader(str(source.path / source.gguf_file))
        file_arch = reader.fields["general.architecture"].contents()
        if file_arch != arch:
            raise LoraftError(f"--to llamacpp: the base GGUF is {file_arch!r}, the adapter's architecture {arch!r}")
        shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    return arch, {v: k for k, v in to_gguf.items()}, shapes, attention_heads(model_config) if permute else None


def read_gguf(path: Path, model_config, source) -> list[ModuleFactors]:
    """A LoRA GGUF as llama-adapter.cpp loads it and build_lora_mm applies it: type keys, architecture,
    <base>.lora_a/.lora_b pairs whose base tensor exists with a.ne[0] == W.ne[0], b.ne[1] == W.ne[1],
    a.ne[1] == b.ne[0]; scale alpha / b.ne[0]. Q/K rows are mapped back to HF's layout for the check."""
    arch, to_module, shapes, heads = gguf_base_index(model_config, source)
    reader = gguf.GGUFReader(str(path))
    fields = {k: reader.fields[k].contents() for k in ("general.type", "adapter.type", "adapter.lora.alpha", "general.architecture") if k in reader.fields}
    if fields.get("general.type") != "adapter" or fields.get("adapter.type") != "lora":
        raise VerificationError(f"llamacpp: {path.name} lacks general.type=adapter / adapter.type=lora")
    if fields.get("general.architecture") != arch:
        raise VerificationError(f"llamacpp: model arch and LoRA arch mismatch ({fields.get('general.architecture')} vs {arch})")
    alpha = float(fields.get("adapter.lora.alpha", 0.0))
    pairs: dict[str, dict[str, object]] = {}
    for t in reader.tensors:
        base, _, suffix = t.name.rpartition(".")
        if suffix not in ("lora_a", "lora_b"):
            raise VerificationError(f"llamacpp: tensor {t.name} has an unexpected suffix")
        pairs.setdefault(base, {})[suffix] = t
    modules = []
    for base, parts in sorted(pairs.items()):
        if len(parts) != 2:
            raise VerificationError(f"llamacpp: LoRA tensor pair for {base} is missing one component")
        if base not in shapes or base not in to_module:
            raise VerificationError(f"llamacpp: LoRA tensor {base} does not exist in base model")
        a, b = parts["lora_a"], parts["lora_b"]
        a_ne, b_ne, w_ne = [int(x) for x in a.shape], [int(x) for x in b.shape], shapes[base]
        if w_ne[0] != a_ne[0] or w_ne[1] != b_ne[1]:
            raise VerificationError(f"llamacpp: tensor {base} has incorrect shape")
        if a_ne[1] != b_ne[0]:
            raise VerificationError("llamacpp: lora_a tensor is not transposed")
        A = torch.from_numpy(a.data.copy()).float().reshape(a_ne[1], a_ne[0])
        B = torch.from_numpy(b.data.copy()).float().reshape(b_ne[1], b_ne[0])
        module = to_module[base]
        n = qk_heads(module, heads)
        if n is not None:
            B = unpermute_rows(B, n)
        modules.append(ModuleFactors(module, A, B, RULES["llamacpp"].scale(alpha, b_ne[0], b_ne[0], False)))
    return modules
