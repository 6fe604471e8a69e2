"""A cheap, dtype-independent fingerprint of a model's weights.

An adapter merged onto a base other than its own gives garbage with no error, so `train` records
the base's fingerprint and `merge`/`eval` refuse a base whose fingerprint differs.

Reading every byte of a 16 GB checkpoint would take minutes, so we hash, per tensor: its name,
shape, and a fixed sample of up to 8 rows (evenly spaced) rounded to bfloat16. Any two different
fine-tunes of one architecture differ in those rows; the same weights stored as fp32, bf16 or in
other shards give the same fingerprint. A .gguf file is fingerprinted from its bytes (its weights
are quantized blocks, not tensors we can compare to a dense copy).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from lora_ft.errors import ModelError

SAMPLE_ROWS = 8
FINGERPRINT_VERSION = "lf1"


def fingerprint_tensors(named: Iterable[tuple[str, "TensorRows"]]) -> str:
    digest = hashlib.sha256()
    for name, rows in sorted(named, key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(json.dumps(list(rows.shape)).encode())
        sample = rows.sample().to(torch.bfloat16).contiguous().view(torch.int16)
        digest.update(sample.numpy().tobytes())
    return f"{FINGERPRINT_VERSION}:{digest.hexdigest()[:32]}"


class TensorRows:
    """A tensor (or a lazily read safetensors slice) that can give its fingerprint sample."""

    def __init__(self, shape, get_rows):
        self.shape = tuple(shape)
        self._get_rows = get_rows

    def sample(self) -> torch.Tensor:
        if len(self.shape) == 0:
            return self._get_rows(None).reshape(1).float()
        return torch.cat([self._get_rows(i).reshape(-1).float() for i in _sample_index(self.shape[0])])


def _tensor_rows(tensor: torch.Tensor) -> TensorRows:
    t = tensor.detach().cpu()
    return TensorRows(t.shape, lambda i: t if i is None else t[i])


def fingerprint_state_dict(state_dict: dict[str, torch.Tensor]) -> str:
    return fingerprint_tensors((k, _tensor_rows(v)) for k, v in state_dict.items())


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def iter_safetensors_rows(files: list[Path]) -> Iterator[tuple[str, TensorRows]]:
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                sl = handle.get_slice(name)
                shape = sl.get_shape()
                if len(shape) == 0:
                    value = handle.get_tensor(name)
                    yield name, TensorRows(shape, lambda i, v=value: v)
                else:
                    # Read the sampled rows now, while the file is open.
                    picked = {i: sl[i : i + 1] for i in _sample_index(shape[0])}
                    yield name, TensorRows(shape, lambda i, picked=picked: picked[i])


def _sample_index(n: int) -> list[int]:
    return sorted({round(i * (n - 1) / max(SAMPLE_ROWS - 1, 1)) for i in range(min(n, SAMPLE_ROWS))})


def fingerprint_gguf(path: Path) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with path.open("rb") as handle:
        for k in range(16):
            handle.seek(k * max(size - 65536, 0) // 15)
            digest.update(handle.read(65536))
    return f"{FINGERPRINT_VERSION}-gguf:{digest.hexdigest()[:32]}"


def fingerprint_model_path(model_dir: Path, gguf_file: str | None = None) -> str:
    """Fingerprint of the weights in a local model folder (safetensors) or a .gguf file."""
    if gguf_file is not None:
        return fingerprint_gguf(Path(model_dir) / gguf_file)
    files = weight_files(model_dir)
    if not files:
        raise ModelError(f"{model_dir}: no .safetensors weights to fingerprint")
    return fingerprint_tensors(iter_safetensors_rows(files))
