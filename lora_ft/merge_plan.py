"""The merge plan and its shard pass: which output tensor comes from which base tensor with what change (metadata
only), then one pass over the base's shards writing each merged tensor straight into its output shard, and for a
QLoRA adapter which full-precision weights to merge into. merge.py runs it; merge_check.py checks what it wrote."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from transformers import AutoConfig
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming

from lora_ft.errors import LoraftError, VerificationError
from lora_ft.merge_check import check_module
from lora_ft.model.loading import DTYPES, PRECISION_DTYPES, resolve_dtype
from lora_ft.artifacts.adapter import AdapterWeights, ModuleFactors
from lora_ft.artifacts.adapter_run import AdapterRun
from lora_ft.artifacts.run_dir import atomic_write_json
from lora_ft.artifacts.shards import INDEX, ShardWriter, base_shards, read_tensor, shard_index
from lora_ft.model.shapes import meta_model

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# ---------------------------------------------------------------------------------------------
# Plan: which output tensor comes from which base tensor, with what change (metadata only)


@dataclass(frozen=True)
class TensorJob:
    name: str  # name in the output
    source: Path  # base shard to read from
    source_name: str  # tensor to read (differs for an untied lm_head, read from the embedding)
    shape: tuple[int, ...]
    dtype: torch.dtype  # output dtype of this tensor
    delta: ModuleFactors | None = None
    bias_delta: torch.Tensor | None = None
    replacement: torch.Tensor | None = None
    roundtrip: "object | None" = None  # QLoRA 'dequantized': the 4-bit quantize->dequantize of training
    token_rows: tuple[list[int], torch.Tensor] | None = None  # trained rows written over the base's

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class MergePlan:
    shards: list[tuple[str, list[TensorJob]]]  # output file name -> its tensors, in write order
    dtype: torch.dtype
    base_dir: Path
    adapter: AdapterWeights
    untie: bool  # the adapter changes a tied embedding or lm_head: write both, untie in config.json
    qlora_base: str | None
    largest_base_shard: int
    n_params: int
    adapted_weights: set[str] = field(default_factory=set)


def plan_merge(base_dir: Path, adapter: AdapterWeights, dtype: str, qlora: "QloraChoice | None" = None) -> MergePlan:
    files = base_shards(base_dir)
    qlora = with_quantized_names(qlora, base_dir)
    located = shard_index(files)
    out_dtype = _output_dtype(dtype, located)
    embed, head, tied = _embedding_names(base_dir)
    adapter = checkpoint_deltas(adapter, located, base_dir)

    missing = [
        n for n in list(adapter.factors) + list(adapter.replacements) + list(adapter.bias) + list(adapter.token_rows)
        if n not in located and not (tied and n == head)
    ]
    if missing:
        raise LoraftError(
            f"--base: the adapter changes {missing[0]} (and {len(missing) - 1} more), which this base does not have; "
            "it was trained on another architecture"
        )
    touched = set(adapter.factors) | set(adapter.replacements)
    untie = tied and head not in located and bool({embed, head} & touched)

    shards: list[tuple[str, list[TensorJob]]] = []
    for k, path in enumerate(files):
        jobs = []
        for name, (src, shape, src_dtype) in located.items():
            if src != path:
                continue
            jobs.append(_job(name, src, name, shape, src_dtype, out_dtype, adapter, qlora))
            if untie and name == embed:  # lm_head keeps the base embedding, as under PEFT
                jobs.append(_job(head, src, embed, shape, src_dtype, out_dtype, adapter, qlora, adapter.token_rows.get(embed)))
        shards.append((f"model-{k + 1:05d}-of-{len(files):05d}.safetensors", jobs))
    n_params = sum(math.prod(j.shape) for _, jobs in shards for j in jobs)
    return MergePlan(
        shards, out_dtype, base_dir, adapter, untie, qlora.mode if qlora else None,
        max(p.stat().st_size for p in files), n_params, set(adapter.factors),
    )


def checkpoint_deltas(adapter: AdapterWeights, located: dict, base_dir: Path) -> AdapterWeights:
    """The adapter's updates keyed by the base checkpoint's own tensor names.

    transformers 5 fuses each MoE layer's experts into 3-D parameters when it loads a checkpoint and splits
    them again when it saves one (its conversion mapping: per-expert `experts.<e>.gate_proj.weight` and
    `up_proj` rows concatenated into `experts.gate_up_proj`, Mixtral's `block_sparse_moe` renamed `mlp`).
    Merging writes the checkpoint's layout, so each expert's update s*B_e@A_e goes to its own per-expert
    tensor (the rows of the fused one it came from): every adapted tensor stays 2-D and checked as before."""
    if not adapter.fused:
        return adapter

    model_type = AutoConfig.from_pretrained(str(base_dir)).model_type
    names = _checkpoint_names(located, get_checkpoint_conversion_mapping(model_type) or [])
    deltas = dict(adapter.factors)
    done = set()
    for name, (model_name, expert, rows) in names.items():
        update = adapter.fused.get(model_name)
        if update is None:
            continue
        done.add(model_name)
        module = name.removesuffix(".weight")
        if update.experts == 1 and expert is None:
            deltas[name] = ModuleFactors(module, update.A, update.B, update.scale, update.alpha)
            continue
        if expert is None or not update.out_first:
            raise LoraftError(
                f"--adapter: {model_name} is stored fused ({list(located[name][1])}) in this base checkpoint; loraft merges "
                "expert updates into per-expert tensors (the layout transformers saves) only"
            )
        b_e, a_e = update.expert(expert)
        deltas[name] = ModuleFactors(module, a_e, b_e[rows[0] : rows[1]], update.scale, update.alpha)
    missing = sorted(set(adapter.fused) - done)
    if missing:
        raise LoraftError(
            f"--base: the adapter changes {missing[0]} (and {len(missing) - 1} more), which this base checkpoint does not hold"
        )
    return replace(adapter, factors=deltas, fused={})


def _checkpoint_names(located: dict, conversions: list) -> dict[str, tuple[str, int | None, tuple[int, int] | None]]:
    """Base tensor name -> (the model's parameter it becomes, expert index, its rows in that parameter)."""
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    found = {}
    for name in located:
        renamed = name
        for renaming in renamings:
            for source, target in zip(renaming.source_patterns, renaming.target_patterns):
                renamed = re.sub(source, target, renamed)
        found[name] = (renamed, None, None)
        for converter in converters:
            ops = [type(op) for op in converter.operations]
            if ops not in ([MergeModulelist], [MergeModulelist, Concatenate]) or len(converter.target_patterns) != 1:
                continue
            patterns = [re.escape(p).replace(r"\*", r"(\d+)") for p in converter.source_patterns]
            for j, pattern in enumerate(patterns):
                match = re.search(pattern, renamed)
                if match is None:
                    continue
                expert = int(match.group(1))
                before, after = renamed[: match.start()], renamed[match.end() :]
                offset = 0
                for k in range(j):  # rows of the tensors concatenated before this one (same expert)
                    sibling = name.replace(match.group(0), converter.source_patterns[k].replace("*", str(expert)))
                    offset += located[sibling][1][0]
                rows = located[name][1][0]
                found[name] = (before + converter.target_patterns[0] + after, expert, (offset, offset + rows))
    return found


def _job(name, src, source_name, shape, src_dtype, out_dtype, adapter: AdapterWeights, qlora, token_rows=None) -> TensorJob:
    delta = adapter.factors.get(name)
    replacement = adapter.replacements.get(name)
    # Under PEFT an output layer tied to the embedding reads the same trained rows.
    token_rows = token_rows or adapter.token_rows.get(name)
    if token_rows is not None:
        ids, rows = token_rows
        if delta is not None or replacement is not None:
            raise LoraftError(f"--adapter: {name} has trained token rows and another update; loraft cannot merge both")
        if max(ids) >= shape[0] or rows.shape[1] != shape[1]:
            raise LoraftError(f"--base: {name} has shape {list(shape)}, which the adapter's trained rows do not fit; wrong base")
    if delta is not None:
        want = (delta.A.shape[1], delta.B.shape[0]) if delta.transpose else (delta.B.shape[0], delta.A.shape[1])
        if tuple(shape) != want:
            raise LoraftError(f"--base: {name} has shape {list(shape)} but the adapter's update is {list(want)}; wrong base")
    if replacement is not None and tuple(replacement.shape) != tuple(shape):
        raise LoraftError(f"--base: {name} has shape {list(shape)} but the adapter's copy is {list(replacement.shape)}")
    dtype = out_dtype if src_dtype.is_floating_point else src_dtype
    roundtrip = qlora.roundtrip if qlora and qlora.mode == "dequantized" and name in qlora.quantized else None
    return TensorJob(name, src, source_name, tuple(shape), dtype, delta, adapter.bias.get(name), replacement, roundtrip, token_rows)


def _output_dtype(dtype: str, located: dict) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    sizes: dict[torch.dtype, int] = {}
    for _, shape, dt in located.values():
        if dt.is_floating_point:
            sizes[dt] = sizes.get(dt, 0) + math.prod(shape)
    found = max(sizes, key=sizes.get) if sizes else torch.float32
    return found if found in DTYPE_NAMES else torch.float32


def _embedding_names(base_dir: Path) -> tuple[str, str, bool]:
    """Tensor names of the input embedding and lm_head, and whether config.json ties them (from a meta model)."""
    config = AutoConfig.from_pretrained(str(base_dir))
    model = meta_model(config)
    names = {id(m): n for n, m in model.named_modules()}
    embed = names[id(model.get_input_embeddings())] + ".weight"
    out = model.get_output_embeddings()
    head = names[id(out)] + ".weight" if out is not None else "lm_head.weight"
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return embed, head, tied


# ---------------------------------------------------------------------------------------------
# The shard pass


@dataclass(frozen=True)
class Written:
    weight_map: dict[str, str]
    total_bytes: int
    seconds: float
    max_abs_error: float
    max_error_to_bound: float
    checked: int
    scalings: list[float]


def write_merged(plan: MergePlan, out_dir: Path, console) -> Written:
    started = time.time()
    weight_map: dict[str, str] = {}
    total = sum(j.nbytes for _, jobs in plan.shards for j in jobs)
    worst_abs, worst_ratio, checked = 0.0, 0.0, 0
    with Progress(
        TextColumn("merging {task.fields[shard]}"), BarColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    ) as progress:
        task = progress.add_task("merge", total=total, shard="")
        for file_name, jobs in plan.shards:
            progress.update(task, shard=file_name)
            with ShardWriter(out_dir / file_name, [(j.name, j.dtype, j.shape) for j in jobs]) as writer:
                for job in jobs:
                    tensor, check = _merged_tensor(job)
                    writer.write(job.name, tensor)
                    del tensor
                    if check is not None:
                        worst_abs, worst_ratio = max(worst_abs, check[0]), max(worst_ratio, check[1])
                        checked += 1
                    weight_map[job.name] = file_name
                    progress.advance(task, job.nbytes)
    atomic_write_json(out_dir / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    if checked != len(plan.adapter.factors) or not checked:
        raise VerificationError(f"merge: {checked} of {len(plan.adapter.factors)} adapted tensors were written and checked")
    scalings = [d.scale for d in plan.adapter.factors.values()]
    return Written(weight_map, total, time.time() - started, worst_abs, worst_ratio, checked, scalings)




def _merged_tensor(job: TensorJob) -> tuple[torch.Tensor, tuple[float, float] | None]:
    """The output tensor for one job, and for an adapted weight its check figures (max abs error, error/bound)."""
    weight = job.replacement if job.replacement is not None else read_tensor(job.source, job.source_name)
    if job.bias_delta is not None:
        return (weight.float() + job.bias_delta).to(job.dtype), None
    if job.token_rows is not None:  # PEFT's trainable tokens replace whole rows (TrainableTokensLayer.merge)
        ids, rows = job.token_rows
        out = weight.to(job.dtype, copy=True)
        out[torch.tensor(ids)] = rows.to(job.dtype)
        return out, None
    if job.delta is None:
        out = (job.roundtrip(weight.float()) if job.roundtrip is not None else weight).to(job.dtype)
        if job.dtype == torch.float16 and weight.dtype != torch.float16 and not torch.isfinite(out).all():
            raise LoraftError(f"--dtype float16: {job.name} has values beyond float16's range (65504); use bfloat16")
        return out, None
    base = weight.float()
    del weight
    if job.roundtrip is not None:
        base = job.roundtrip(base)
    d = job.delta
    merged = base + d.delta()
    factor = None
    if d.magnitude is not None:
        # DoRA (peft/tuners/lora/dora.py get_weight_norm): the L2 norm of each output row of W + sBA
        # (dim=1 of the (out, in) weight), taken from the unmerged weight; W' = m / norm * (W + sBA).
        rows = merged.T if d.transpose else merged
        factor = d.magnitude.float() / torch.linalg.norm(rows, dim=1)
        rows.mul_(factor.view(-1, 1))
    out = merged.to(job.dtype)
    del merged
    return out, check_module(job, base, out, factor)


# ---------------------------------------------------------------------------------------------
# QLoRA adapters: which full-precision weights to merge into


@dataclass(frozen=True)
class QloraChoice:
    mode: str  # original | dequantized
    quantized: frozenset  # base tensor names bitsandbytes quantized in training
    roundtrip: "object | None"


def qlora_choice(run: AdapterRun, qlora_base: str) -> QloraChoice | None:
    """An adapter trained on a 4-bit base is merged into full-precision weights, never 4-bit ones:
    the original weights (default), or the 4-bit round trip of them that training actually saw."""
    quant = run.trained_quantization
    if qlora_base not in ("original", "dequantized"):
        raise LoraftError(f"--qlora-base: {qlora_base!r} is not one of original, dequantized")
    if not quant:
        if qlora_base == "dequantized":
            raise LoraftError("--qlora-base dequantized: this adapter was not trained on a quantized base; leave the option out")
        return None
    if qlora_base == "original":
        return QloraChoice("original", frozenset(), None)
    if quant.bits != 4:
        raise LoraftError("--qlora-base dequantized: reproduces 4-bit (nf4/fp4) training only; use --qlora-base original")
    device = _roundtrip_device()
    if device is None:
        raise LoraftError(
            "--qlora-base dequantized: the 4-bit round trip runs in bitsandbytes' CUDA kernels and no GPU is visible; "
            "run on a CUDA machine or use --qlora-base original"
        )
    return QloraChoice("dequantized", frozenset(), _nf4_roundtrip(quant, _training_dtype(run), device))


def _roundtrip_device() -> str | None:
    """Training quantized with bitsandbytes' CUDA kernels; its CPU kernels are not promised to round the
    same way, so reproducing what the adapter saw needs CUDA."""
    return "cuda" if torch.cuda.is_available() else None


def _training_dtype(run: AdapterRun) -> torch.dtype:
    precision = run.manifest.precision  # only QLoRA runs come here, and loraft wrote their manifest
    if run.config is not None:
        return resolve_dtype(run.config.model, precision)
    return PRECISION_DTYPES[precision]


def _nf4_roundtrip(quant, load_dtype: torch.dtype, device: str):
    """W -> dequantize(quantize_4bit(W)) with the training settings (blocksize 64, as bitsandbytes' Linear4bit)."""

    def roundtrip(weight: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as bnbf  # lazy: only --qlora-base dequantized needs it; its import prints notes on stderr

        w = weight.to(device=device, dtype=load_dtype)
        packed, state = bnbf.quantize_4bit(
            w, blocksize=64, quant_type=quant.quant_type,
            compress_statistics=quant.double_quant, quant_storage=torch.uint8,
        )
        return bnbf.dequantize_4bit(packed, state).float().cpu()

    return roundtrip


def with_quantized_names(choice: QloraChoice | None, base_dir: Path) -> QloraChoice | None:
    """Fill in which tensors training quantized: every nn.Linear weight except the output head
    (transformers keeps lm_head in full precision), adapted or not."""
    if choice is None or choice.mode != "dequantized":
        return choice

    model = meta_model(AutoConfig.from_pretrained(str(base_dir)))
    head = model.get_output_embeddings()
    names = frozenset(
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
    )
    return QloraChoice(choice.mode, names, choice.roundtrip)
