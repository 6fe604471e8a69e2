"""Merge stage: base weights + a LoRA adapter -> an ordinary model folder that needs no PEFT.

Reads the base's safetensors shards one tensor at a time and writes each merged tensor straight
into its output shard, so resident memory stays near one tensor (plus the adapter), whatever the
model's size. For every adapted weight W' = W + s*B@A in fp32 (s = alpha/r, or alpha/sqrt(r) with
rsLoRA; DoRA rescales each output row to its trained magnitude), then cast to the output dtype.
Each adapted tensor is checked as it is written (W'x against Wx + s*B(Ax) on random x, within the
output dtype's rounding bound); then, when two copies of the model fit in memory, the merged
folder is loaded with plain transformers and its logits compared with base+adapter under PEFT.
Everything is written to a temporary sibling folder, renamed to --out only after the checks pass.
Pitfall guarded: an adapter merged onto the wrong base gives garbage silently, so the base's
fingerprint must match the one recorded at training time (--force overrides, and is recorded).
Shard reading/writing lives in shards.py, the two checks in merge_check.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from lora_ft.model.speed import one_torch_thread
from lora_ft import __version__
from lora_ft.errors import LoraftError, VerificationError
from lora_ft.artifacts.manifests import (
    MergeManifest, MergedAdapterRecord, MergedBaseRecord, ModuleCheckRecord, VerificationRecord, write_manifest,
)
from lora_ft.merge_check import check_module, full_check_unfits, verify_logits
from lora_ft.artifacts.adapter import AdapterRun, AdapterWeights, ModuleFactors
from lora_ft.artifacts.locks import sweep_leftovers
from lora_ft.artifacts.run_dir import atomic_dir, atomic_write_json, require_new_out
from lora_ft.artifacts.shards import INDEX, ShardWriter, base_shards, read_tensor, shard_index

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------------
# Result


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    manifest: MergeManifest

    def summary(self) -> str:
        m = self.manifest
        mod = m.verification.per_module
        matches = m.base_model.fingerprint_matches
        lines = [
            f"merged model written to {self.out_dir}",
            f"base            {m.base_model.name} (fingerprint {m.base_model.fingerprint}, "
            f"{'matches the adapter' if matches else 'NOT CHECKED' if matches is None else 'MISMATCH, merged with --force'})",
            f"weights         {m.dtype}, {m.shards} shard(s), {m.bytes_written / 2**30:.2f} GiB "
            f"in {m.merge_seconds:.1f}s ({m.mb_per_s:.0f} MB/s)",
            f"adapted         {mod.tensors} tensors (scaling {_scalings(m.scalings)}); "
            f"{len(m.replaced)} replaced by the adapter's copies"
            + "".join(f"; {len(ids)} trained token rows in {name}" for name, ids in m.token_rows.items())
            + (f"; qlora base: {m.qlora_base}" if m.qlora_base else ""),
            f"per-module      max |W'x - (Wx + sBAx)| = {mod.max_abs_error:.3g} "
            f"({mod.max_error_to_bound:.3f} of the {m.dtype} rounding bound)",
        ]
        full = m.verification.logits
        if full is None:
            lines.append(f"logits check    skipped: {m.verification.logits_skipped}")
        else:
            lines.append(
                f"logits check    max |merged - base+adapter| = {full['max_abs_diff']:.3g} over {full['prompts']} prompts "
                f"({full['tokens']} tokens), tolerance {full['tolerance']:.3g}: ok"
            )
        if m.force:
            lines.append("warning         --force: this base is not the one the adapter was trained on")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"out_dir": str(self.out_dir), "manifest": self.manifest.model_dump(mode="json")}


def _scalings(scalings: list[float]) -> str:
    values = sorted(set(scalings))
    return ", ".join(f"{s:g}" for s in values[:4]) + (" ..." if len(values) > 4 else "")


# ---------------------------------------------------------------------------------------------
# The stage


def merge(
    adapter: str | Path,
    out: str | Path,
    *,
    base: str | None = None,
    dtype: str = "auto",
    force: bool = False,
    qlora_base: str = "original",
    verify: bool = True,
    console=None,
) -> MergeResult:
    console = console or _default_console()
    started = time.time()
    out = require_new_out(out)
    run = AdapterRun.load(adapter)
    spec, source, matches = run.resolve_base(base, force=force)
    sweep_leftovers(out, lambda line: console.print(f"note: {line}", markup=False, highlight=False))
    qlora = _qlora_choice(run, qlora_base)
    lora = load_adapter(run, None if source.gguf_file else source.path)

    with one_torch_thread(), atomic_dir(out) as staging, _base_checkpoint(spec, source, out.parent, console) as base_dir:
        plan = plan_merge(base_dir, lora, dtype, qlora)
        written = write_merged(plan, staging, console)
        tokenizer = write_sidecars(plan, base_dir, run, spec, source, staging)
        logits = None
        skipped = "--no-verify"
        if verify:
            skipped = full_check_unfits(plan)
            if skipped is None:
                with console.status("verifying: merged model vs base + adapter (PEFT)"):
                    logits = verify_logits(staging, run, plan, tokenizer, trust_remote_code=spec.trust_remote_code)
        manifest = _manifest(run, spec, source, matches, force, plan, written, logits, skipped, time.time() - started)
        (staging / "README.md").write_text(model_card(manifest), encoding="utf-8")
        write_manifest(staging, manifest)
        _readable_by_all(staging)
    return MergeResult(out.resolve(), manifest)


def _readable_by_all(folder: Path) -> None:
    """Temporary folders and files are created private (0700/0600); a model folder is meant to be read
    by servers running as other users, so give it the permissions the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o755 & ~umask)
    for item in folder.iterdir():
        item.chmod((0o755 if item.is_dir() else 0o644) & ~umask)


def _default_console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)  # a warning stays one line when piped


# ---------------------------------------------------------------------------------------------
# The adapter: read by artifacts/adapter.py; here only what merge cannot fold exactly is refused


def load_adapter(run: AdapterRun, base_dir: Path | None = None) -> AdapterWeights:
    """The run's adapter (artifacts/adapter.py's one reader), refusing what cannot be merged exactly.
    LoRA on expert/router parameters (target_parameters) needs the base's config (`base_dir`) for its layout."""
    weights = run.weights(_parameter_wrappers(run, base_dir))
    for factors in weights.factors.values():
        if factors.magnitude is not None and factors.transpose and not run.adapter.fan_in_fan_out:
            raise LoraftError(f"--adapter: {factors.module} is a DoRA embedding, which loraft cannot merge")
    return weights


def _parameter_wrappers(run: AdapterRun, base_dir: Path | None) -> dict:
    from transformers import AutoConfig

    from lora_ft.model.coverage import wrappers_for_adapter

    if not run.adapter.target_parameters:
        return {}
    if base_dir is None:
        raise LoraftError(
            "--adapter: LoRA on MoE expert/router parameters (target_parameters) is read with the base model's config; "
            "merge it (loraft merge, or loraft export --to merged)"
        )
    trust = bool(run.config and run.config.model.trust_remote_code)
    return wrappers_for_adapter(AutoConfig.from_pretrained(str(base_dir), trust_remote_code=trust), run.adapter_config, trust)


# ---------------------------------------------------------------------------------------------
# The base checkpoint as safetensors shards


@contextmanager
def _base_checkpoint(spec, source, scratch_parent: Path, console) -> Iterator[Path]:
    """The base as a folder of safetensors shards.

    A .gguf base has no shards: transformers dequantizes it (the same weights training saw), and we
    save that once as safetensors in a temporary folder beside --out, then merge as for any folder.
    This holds the whole dequantized model in memory once, so it suits the small GGUF models
    loraft trains from GGUF (the quickstart's 135M); large bases come as safetensors.
    """
    if source.gguf_file is None:
        yield source.path
        return
    from lora_ft.model.loading import load_base_model

    scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".gguf-dequantized-", dir=scratch_parent))
    try:
        with console.status(f"dequantizing {source.gguf_file} to safetensors"):
            model = load_base_model(spec.model_copy(update={"dtype": "float32", "quantization": None}), source, "fp32")
            model.save_pretrained(str(scratch), safe_serialization=True)
            del model
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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
    from dataclasses import replace

    from transformers import AutoConfig
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

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
    import re

    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming

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
    from transformers import AutoConfig

    from lora_ft.model.shapes import meta_model

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
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

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


def _qlora_choice(run: AdapterRun, qlora_base: str) -> QloraChoice | None:
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
    from lora_ft.model.loading import PRECISION_DTYPES, resolve_dtype

    precision = run.manifest.precision  # only QLoRA runs come here, and loraft wrote their manifest
    if run.config is not None:
        return resolve_dtype(run.config.model, precision)
    return PRECISION_DTYPES[precision]


def _nf4_roundtrip(quant, load_dtype: torch.dtype, device: str):
    """W -> dequantize(quantize_4bit(W)) with the training settings (blocksize 64, as bitsandbytes' Linear4bit)."""

    def roundtrip(weight: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

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
    from transformers import AutoConfig

    from lora_ft.model.shapes import meta_model

    model = meta_model(AutoConfig.from_pretrained(str(base_dir)))
    head = model.get_output_embeddings()
    names = frozenset(
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
    )
    return QloraChoice(choice.mode, names, choice.roundtrip)


# ---------------------------------------------------------------------------------------------
# Beside the weights: config, generation config, tokenizer


def write_sidecars(plan: MergePlan, base_dir: Path, run: AdapterRun, spec, source, out_dir: Path):
    from lora_ft.model.loading import load_tokenizer

    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)  # merged weights are dense; a leftover marker makes loaders quantize
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = DTYPE_NAMES[plan.dtype]
    if plan.untie:
        config["tie_word_embeddings"] = False
    atomic_write_json(out_dir / "config.json", config)
    # The run's generation config stops at the template's end-of-turn token; a base's often does not.
    for folder in (run.path, base_dir):
        if (folder / "generation_config.json").is_file():
            shutil.copy2(folder / "generation_config.json", out_dir / "generation_config.json")
            break
    # The tokenizer exactly as trained (with its chat template) when the adapter folder has it.
    if (run.path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(run.path))
    else:
        tokenizer = load_tokenizer(spec, source)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Manifest and model card


def _manifest(run, spec, source, matches, force, plan: MergePlan, written: Written, logits, skipped, seconds) -> MergeManifest:
    from lora_ft.artifacts.fingerprint import fingerprint_model_path

    recorded = run.base_fingerprint
    actual = recorded if matches else fingerprint_model_path(source.path, source.gguf_file)
    adapter = plan.adapter.config
    return MergeManifest(
        loraft_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        base_model=MergedBaseRecord(
            name=spec.name,
            resolved_path=source.display,
            fingerprint=actual,
            recorded_fingerprint=recorded,
            fingerprint_matches=matches,
        ),
        force=force,
        adapter=MergedAdapterRecord(
            path=str(run.path),
            sha256=plan.adapter.sha256,
            rank=adapter.rank,
            alpha=adapter.alpha,
            use_rslora=adapter.use_rslora,
            use_dora=adapter.use_dora,
            trained_quantization=run.trained_quantization,
        ),
        qlora_base=plan.qlora_base,
        dtype=DTYPE_NAMES[plan.dtype],
        shards=len(plan.shards),
        bytes_written=written.total_bytes,
        merge_seconds=round(written.seconds, 2),
        mb_per_s=written.total_bytes / 1e6 / max(written.seconds, 1e-9),
        adapted_tensors=sorted(plan.adapted_weights),
        scalings=written.scalings,
        replaced=sorted(plan.adapter.replacements),
        token_rows={name: ids for name, (ids, _) in sorted(plan.adapter.token_rows.items())},
        untied_embeddings=plan.untie,
        verification=VerificationRecord(
            per_module=ModuleCheckRecord(
                tensors=written.checked,
                max_abs_error=written.max_abs_error,
                max_error_to_bound=written.max_error_to_bound,
            ),
            logits=logits,
            logits_skipped=skipped if logits is None else None,
        ),
        serving=run.config.serving if run.config is not None else None,
        wall_seconds=round(seconds, 1),
    )


def model_card(m: MergeManifest) -> str:
    base = m.base_model.name
    logits = m.verification.logits
    check = (
        f"max |logit difference| {logits['max_abs_diff']:.3g} against base+adapter under PEFT "
        f"(tolerance {logits['tolerance']:.3g}, {logits['prompts']} prompts)"
        if logits else f"logits check skipped ({m.verification.logits_skipped})"
    )
    commands = {
        "vllm": "vllm serve <this folder>",
        "sglang": "python -m sglang.launch_server --model-path <this folder>",
    }
    targets = m.serving.targets if m.serving is not None else ()
    serve = next((commands[t] for t in targets if t in commands), None)
    serve_text = f"\nServe it: `{serve}`\n" if serve else ""
    forced = "\n**Merged with --force onto a base other than the adapter's own.**\n" if m.force else ""
    return f"""---
base_model: {base}
tags: [lora, merged, loraft]
---
# {Path(m.adapter.path).name} merged into {base}

An ordinary {m.dtype} model folder: the LoRA adapter (rank {m.adapter.rank}, alpha {m.adapter.alpha:g}
{', rsLoRA' if m.adapter.use_rslora else ''}{', DoRA' if m.adapter.use_dora else ''}) merged into the base weights by loraft {m.loraft_version}; no PEFT needed.
{forced}
- base fingerprint `{m.base_model.fingerprint}`; adapter sha256 `{m.adapter.sha256[:16]}...`
- {m.verification.per_module.tensors} adapted tensors, each checked as written (W'x against Wx + sBAx)
- {check}
{f"- QLoRA adapter merged into the {m.qlora_base} full-precision weights" if m.qlora_base else ''}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("<this folder>")
tokenizer = AutoTokenizer.from_pretrained("<this folder>")
```
{serve_text}"""
