"""Safetensors shards, one tensor at a time: find a checkpoint's shards, read one tensor, stream one out.

Memory is the point: reading opens the shard per tensor (its memory map's touched pages count as
resident memory, so the map must not outlive the tensor), and writing puts the header first (it is
known from the shapes) and each tensor's bytes as soon as they exist, so no shard is ever held whole.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open

from lora_ft.errors import ModelError

INDEX = "model.safetensors.index.json"
# safetensors' dtype codes (the file format's spelling).
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_CODES = {v: k for k, v in ST_DTYPES.items()}


def base_shards(base_dir: Path) -> list[Path]:
    """The shards the checkpoint's index names (a stray consolidated.safetensors is not part of it)."""
    index = base_dir / INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [base_dir / f for f in files]
    if (base_dir / "model.safetensors").is_file():
        return [base_dir / "model.safetensors"]
    files = sorted(p for p in base_dir.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if not files:
        raise ModelError(f"--base: {base_dir} has no .safetensors weights")
    return files


def shard_index(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], torch.dtype]]:
    """Every tensor's shard, shape and dtype, from the headers alone."""
    located = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                sl = handle.get_slice(name)
                located[name] = (path, tuple(sl.get_shape()), ST_DTYPES[sl.get_dtype()])
    return located


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor from a shard, opened for this tensor alone so that its memory map (whose touched
    pages count as resident memory) never spans more than the tensor in hand."""
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(name)


class ShardWriter:
    """Writes one safetensors file tensor by tensor: the header (names, dtypes, shapes, offsets) is
    known from the plan, so it goes first and each tensor's bytes follow as soon as they exist.
    Format: 8-byte little-endian header length, JSON header padded to 8 bytes, raw little-endian data."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        self.path = Path(path)
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        self.expected: list[tuple[str, int]] = []
        for name, dtype, shape in entries:
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.expected.append((name, size))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._prefix = len(raw).to_bytes(8, "little") + raw
        self._next = 0
        self._handle = None

    def __enter__(self) -> "ShardWriter":
        self._handle = self.path.open("wb")
        self._handle.write(self._prefix)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, size = self.expected[self._next]
        if name != want or tensor.numel() * tensor.element_size() != size:
            raise RuntimeError(f"ShardWriter: got {name} ({tensor.numel() * tensor.element_size()} bytes), expected {want} ({size})")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._handle.write(memoryview(data))
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        handle, self._handle = self._handle, None
        try:
            if exc_type is None:
                if self._next != len(self.expected):
                    raise RuntimeError(f"ShardWriter: {self.path.name} got {self._next} of {len(self.expected)} tensors")
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            handle.close()
