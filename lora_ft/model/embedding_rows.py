"""The base's embedding rows, read from its files without loading the model (stop_tokens' check and inspect).

`embedding_modules` names the input and output embeddings on a meta model (PEFT's trainable_token_indices
keys); `RowReader` reads chosen rows of them from the safetensors shards (memory-mapped) or the GGUF file
(dequantized row by row), so checking a few token rows of an 8B base costs a few MB, not the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lora_ft.artifacts.shards import base_shards, shard_index
from lora_ft.model.shapes import meta_model

GGUF_NAMES = {"input": "token_embd.weight", "output": "output.weight"}


@dataclass(frozen=True)
class EmbeddingModules:
    """Module paths of the input and output embeddings (PEFT's trainable_token_indices keys)."""

    input: str
    output: str | None
    tied: bool
    output_bias: bool = False  # PEFT 0.21 drops it when training output rows (huggingface/peft#3649)


def embedding_modules(model_config, trust_remote_code: bool = False) -> EmbeddingModules:
    model = meta_model(model_config, trust_remote_code)
    names = {id(m): n for n, m in model.named_modules()}
    head = model.get_output_embeddings()
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    bias = head is not None and getattr(head, "bias", None) is not None
    return EmbeddingModules(names[id(model.get_input_embeddings())], names.get(id(head)) if head is not None else None, tied, bias)


class RowReader:
    """Rows of the base's embedding matrices, read one at a time from safetensors (memory-mapped) or GGUF
    (dequantized row by row), so an 8B model costs a few MB."""

    def __init__(self, source):
        self.source = source
        self._gguf = None
        self._located: dict[str, tuple[Path, str]] | None = None

    def rows(self, module: str, role: str, ids) -> torch.Tensor | None:
        """(len(ids), hidden) float32, or None when the weights hold no such tensor."""
        ids = [int(i) for i in ids]
        if self.source.gguf_file is not None:
            return self._gguf_rows(role, ids)
        found = self._find(module)
        if found is None:
            return None
        path, key = found
        with safe_open(str(path), framework="pt") as handle:
            piece = handle.get_slice(key)
            n = piece.get_shape()[0]
            if ids == list(range(n)):
                return piece[:].float()
            return torch.cat([piece[i : i + 1] for i in ids]).float()

    def n_rows(self, module: str, role: str) -> int | None:
        if self.source.gguf_file is not None:
            tensor = self._gguf_tensor(role)
            return None if tensor is None else int(tensor.data.shape[0])
        found = self._find(module)
        if found is None:
            return None
        with safe_open(str(found[0]), framework="pt") as handle:
            return int(handle.get_slice(found[1]).get_shape()[0])

    def _find(self, module: str) -> tuple[Path, str] | None:
        if self._located is None:
            try:
                located = shard_index(base_shards(Path(self.source.path)))
            except Exception:  # no safetensors (a pickle-only base): nothing to read, the check says so
                located = {}
            self._located = {name: (path, name) for name, (path, _, _) in located.items()}
        wanted = f"{module}.weight"
        for name, found in self._located.items():
            if name == wanted or name.endswith("." + wanted) or wanted.endswith("." + name):
                return found
        return None

    def _gguf_tensor(self, role: str):
        if self._gguf is None:
            import gguf

            reader = gguf.GGUFReader(str(Path(self.source.path) / self.source.gguf_file))
            self._gguf = {t.name: t for t in reader.tensors}
        return self._gguf.get(GGUF_NAMES[role])

    def _gguf_rows(self, role: str, ids: list[int]) -> torch.Tensor | None:
        import gguf
        import numpy as np

        tensor = self._gguf_tensor(role)
        if tensor is None:
            return None
        # Quantization blocks run along a row, so rows dequantize independently.
        rows = gguf.quants.dequantize(np.asarray(tensor.data[ids]), tensor.tensor_type)
        return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
